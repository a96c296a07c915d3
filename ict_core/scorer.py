"""The scorer: ICT (+ optional HP) on one device, batched, with the prompt cache in front of the text tower."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import preprocess, text, weights
from .errors import ICTError, InputError, ModelFileError
from .modeling import RewardModules, build_hp, build_ict, host_storage_dtype, keeps_storage_dtype

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHUNK_BYTES = 256 << 20  # decoded uint8 pixels held by one chunk before it is scored


@dataclass
class ScoreResult:
    index: int
    label: str | None
    prompt: str
    ict: float | None = None
    hp: float | None = None        # sigmoid of the HP head
    hp_raw: float | None = None    # the head's output before the sigmoid (used by the `group` rule)
    score: float | None = None     # ict * hp with an HP model, else ict
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {"image": self.label if self.label is not None else self.index, "prompt": self.prompt,
             "ict": self.ict, "hp": self.hp, "score": self.score}
        return d if self.error is None else {**d, "error": self.error}


@dataclass
class ImageFeatures:
    ict: torch.Tensor                 # [n, d] float32, L2-normalised; NaN rows for failed images
    hp_raw: torch.Tensor | None       # [n] float32 or None without HP
    errors: list[str | None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def cpu_runs_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX: recent Xeons, Zen 4+),
    where a bf16 ViT-H runs 2-3x faster than fp32; elsewhere torch emulates bf16, slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 unless lower precision is asked for (fidelity first); fp16/bf16 on CUDA, and bf16 on a
    CPU that runs it natively (fp16 on a CPU is barely faster than fp32: fp32 there)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision in ("auto", "fp32"):
        return torch.float32
    if device.type != "cuda":
        if precision == "bf16" and cpu_runs_bf16():
            return torch.bfloat16
        if precision == "fp16":
            hint = " (this CPU runs bf16 natively: ask for bf16)" if cpu_runs_bf16() else ""
            log.warning("precision fp16 needs a CUDA GPU; scoring on %s in fp32%s", device.type, hint)
        else:
            log.warning("precision bf16 needs a CUDA GPU or a CPU with native bf16 (AVX512-BF16/AMX); "
                        "scoring on %s in fp32", device.type)
        return torch.float32
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU does not support bf16; use precision fp16 or fp32")
    return _DTYPES[precision]


def default_chunk(device: torch.device) -> int:
    """Images per forward when nothing else says: a host may size chunks from its free memory instead."""
    return 32 if device.type == "cuda" else 8


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


class Scorer:
    """Scores images against prompts. Build with Scorer.load(); hosts may move `modules` between devices."""

    def __init__(self, modules: RewardModules, *, ict_fingerprint: str, hp_fingerprint: str | None = None,
                 dtype: torch.dtype = torch.float32, cache=None, chunk_size: int | None = None,
                 paths: tuple[Path, Path | None] | None = None):
        self.modules, self.dtype, self.cache, self.chunk_size, self.paths = modules, dtype, cache, chunk_size, paths
        self.ict_fingerprint, self.hp_fingerprint = ict_fingerprint, hp_fingerprint
        self.last_cache_stats = _zero_stats()

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, ict_path: str | Path, hp_path: str | Path | None = None, *, device: str | torch.device = "auto",
             precision: str = "auto", cache=None, config: str | Path | None = None,
             chunk_size: int | None = None, run_device: str | torch.device | None = None,
             operations=None, storage_dtype: torch.dtype | None = None) -> Scorer:
        """Load converted safetensors files straight onto the device (no pickle, no random init).

        `run_device`: where a host will run the model when it differs from where the weights wait
        (ComfyUI keeps them on the CPU and moves them to the GPU to score); the precision is resolved
        for it, so fp16/bf16 weights can wait on the CPU.  `operations`: a host's cast-at-use layer classes
        (modeling.use_host_layers), with `storage_dtype` the host's preferred weight dtype."""
        from .config import load_architecture

        dev = resolve_device(device)
        dtype = resolve_dtype(precision, resolve_device(run_device) if run_device is not None else dev)
        arch = load_architecture(config) if config is not None else None
        ict_info = weights.open_model_file(ict_path, "ict", arch)
        hp_info = weights.open_model_file(hp_path, "hp", arch) if hp_path else None
        if hp_info is not None and hp_info.arch["projection_dim"] != ict_info.arch["projection_dim"]:
            raise ModelFileError(f"{hp_path} and {ict_path} are for different architectures; use matching files")
        log.info("loading ICT %s%s on %s (%s)", ict_path, f" + HP {hp_path}" if hp_path else "", dev, dtype)
        if operations is not None:
            ict_for = hp_for = lambda k: host_storage_dtype(k, dtype, storage_dtype)
        else:
            ict_for = lambda k: None if keeps_storage_dtype(k, dtype) else dtype  # noqa: E731
            hp_for = lambda k: torch.float32 if k.startswith("head.") else dtype  # noqa: E731
        ict = build_ict(ict_info.arch, weights.load_state(ict_info, dev, ict_for), dev, dtype, operations)
        hp = None
        if hp_info is not None:  # the tiny head stays fp32 whatever the tower's precision
            hp = build_hp(hp_info.arch, weights.load_state(hp_info, dev, hp_for), dev, dtype, operations)
        return cls(RewardModules(ict, hp), ict_fingerprint=weights.fingerprint(ict_path, ict_info),
                   hp_fingerprint=weights.fingerprint(hp_path, hp_info) if hp_info else None,
                   dtype=dtype, cache=cache, chunk_size=chunk_size,
                   paths=(Path(ict_path), Path(hp_path) if hp_path else None))

    @property
    def device(self) -> torch.device:
        host = getattr(self.modules, "device", None)  # set by a host that loads the layers only in part
        return host if isinstance(host, torch.device) else next(self.modules.ict.parameters()).device

    @property
    def has_hp(self) -> bool:
        return self.modules.hp is not None

    @property
    def prompt_key(self) -> str:
        from .cache import prompt_key

        return prompt_key(self.ict_fingerprint, str(self.dtype))

    @property
    def gallery_key(self) -> str:
        from .cache import gallery_key

        return gallery_key(self.ict_fingerprint, self.hp_fingerprint, str(self.dtype))

    def _chunk(self) -> int:
        return self.chunk_size or default_chunk(self.device)

    # ---------------------------------------------------------------------------------------------- prompts
    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features [n, d] (float32, CPU); cached prompts never reach the text tower."""
        prompts = [text.check_prompt(p) for p in prompts]
        distinct = list(dict.fromkeys(prompts))
        found: dict[str, torch.Tensor] = {}
        if self.cache is not None:
            for p, vec in self.cache.get_prompts(self.prompt_key, distinct).items():
                found[p] = torch.as_tensor(vec, dtype=torch.float32)
        missing = [p for p in distinct if p not in found]
        self.last_cache_stats["prompt_hits"] += len(distinct) - len(missing)
        self.last_cache_stats["prompt_misses"] += len(missing)
        if missing:
            ids = text.tokenize(missing).to(self.device)
            ict = self.modules.ict
            pooled = ict.text_model(input_ids=ids).pooler_output
            feats = _normalise(ict.text_projection(pooled)).cpu()
            new = {p: feats[i] for i, p in enumerate(missing)}
            found.update(new)
            if self.cache is not None:
                self.cache.put_prompts(self.prompt_key, {p: v.numpy() for p, v in new.items()})
        return torch.stack([found[p] for p in prompts])

    # ----------------------------------------------------------------------------------------------- images
    @torch.inference_mode()
    def _forward_images(self, batch: list[torch.Tensor], with_ict: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = preprocess.pixel_values_for(batch, self.device, self.dtype)
        ict = self.modules.ict
        if with_ict:
            feats = _normalise(ict.visual_projection(ict.vision_model(pixel_values=pixels).pooler_output)).cpu()
        else:  # HP alone: the ICT image tower is not run
            feats = torch.full((len(batch), ict.visual_projection.out_features), math.nan)
        hp_raw = self.modules.hp(pixels).cpu() if self.modules.hp is not None else None
        return feats, hp_raw

    def _forward_split(self, batch: list[torch.Tensor], with_ict: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward a chunk; on CUDA out-of-memory, halve it (and later chunks) and retry."""
        try:
            return self._forward_images(batch, with_ict)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError (2.5+) is this class; 2.1-2.4 have only it
            if len(batch) == 1:
                raise ICTError("out of GPU memory for a single image; free memory or use device cpu") from None
            torch.cuda.empty_cache()
            half = len(batch) // 2
            self.chunk_size = max(1, half)
            log.warning("out of GPU memory with %d images per chunk; retrying with %d", len(batch), half)
            a, b = self._forward_split(batch[:half], with_ict), self._forward_split(batch[half:], with_ict)
            return torch.cat([a[0], b[0]]), (torch.cat([a[1], b[1]]) if a[1] is not None else None)

    def encode_images(self, images: Any, *, progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, labels=None,
                      refs: list[preprocess.ImageRef] | None = None, with_ict: bool = True) -> ImageFeatures:
        """Image features in chunks that fit memory. A bad image gets an error entry; the rest go on.
        with_ict=False runs only the HP model (ict rows stay NaN unless the gallery had them)."""
        refs = refs if refs is not None else preprocess.as_refs(images, labels)
        n = len(refs)
        dim = self.modules.ict.visual_projection.out_features
        out = torch.full((n, dim), math.nan)
        hp_out = torch.full((n,), math.nan) if self.has_hp else None
        errors: list[str | None] = [None] * n
        todo = list(range(n))
        if self.cache is not None and n:
            todo = self._from_gallery(refs, out, hp_out)
        done = n - len(todo)
        if progress:
            progress(done, n)
        i = 0
        while i < len(todo):
            if should_stop is not None and should_stop():
                raise InterruptedError("scoring cancelled")
            loaded, ok, held, start = [], [], 0, i
            # a chunk ends at its size, or once its decoded images hold CHUNK_BYTES: large images are
            # decoded a few at a time, never a whole chunk of them at once
            while i < len(todo) and i - start < self._chunk() and held < CHUNK_BYTES:
                j = todo[i]
                i += 1
                try:
                    loaded.append(refs[j].load())
                    ok.append(j)
                    held += loaded[-1].numel()
                except ICTError as e:
                    errors[j] = str(e)
                    log.info("image %s skipped: %s", refs[j].label or j, e)  # the result row carries it
            idx = todo[start:i]
            if loaded:
                feats, hp_raw = self._forward_split(loaded, with_ict)
                out[ok] = feats
                if hp_out is not None:
                    hp_out[ok] = hp_raw
            done += len(idx)
            if progress:
                progress(done, n)
        return ImageFeatures(out, hp_out, errors)

    def _from_gallery(self, refs, out, hp_out) -> list[int]:
        """Reuse image features stored by `ict index`; returns the indices still to encode."""
        if self.cache.image_count(self.gallery_key) == 0:  # nothing indexed: do not hash every image
            self.last_cache_stats["image_misses"] += len(refs)
            return list(range(len(refs)))
        keys: list[str | None] = []
        for r in refs:
            try:
                keys.append(r.digest())
            except (OSError, ICTError):
                keys.append(None)
        hits = self.cache.get_images(self.gallery_key, [k for k in keys if k is not None])
        todo = []
        for i, k in enumerate(keys):
            hit = hits.get(k) if k is not None else None
            if hit is None or (hp_out is not None and math.isnan(hit[1])):
                todo.append(i)
                continue
            out[i] = torch.as_tensor(hit[0], dtype=torch.float32)
            if hp_out is not None:
                hp_out[i] = float(hit[1])
        self.last_cache_stats["image_hits"] += len(refs) - len(todo)
        self.last_cache_stats["image_misses"] += len(todo)
        return todo

    # -------------------------------------------------------------------------------------------------- score
    def score(self, images: Any, prompts: str | Sequence[str] | None, *, progress=None, should_stop=None,
              labels: Sequence[str | None] | None = None) -> list[ScoreResult]:
        """ICT (cosine), HP (sigmoid of the head) and the combined score of each image, in input order.

        prompts=None scores by HP alone (HP needs no prompt): ict is None and score is hp; the ICT
        image tower is not run."""
        self.last_cache_stats = _zero_stats()
        refs = preprocess.as_refs(images, labels)
        if not refs:
            raise InputError("no images to score; give at least one image")
        if prompts is None:
            return self._score_hp(refs, progress, should_stop)
        if isinstance(prompts, str):
            per_image = [text.check_prompt(prompts)] * len(refs)
        else:
            per_image = [text.check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
            if len(per_image) == 1:
                per_image = per_image * len(refs)
            if len(per_image) != len(refs):
                raise InputError(f"{len(per_image)} prompts for {len(refs)} images; give one prompt, or one per image")
        text_feats = self.encode_prompts(per_image)
        feats = self.encode_images(None, progress=progress, should_stop=should_stop, refs=refs)
        ict = (feats.ict * text_feats).sum(dim=-1)
        results = []
        for i, ref in enumerate(refs):
            r = ScoreResult(i, ref.label, per_image[i], error=feats.errors[i])
            if r.error is None:
                r.ict = float(ict[i])
                if feats.hp_raw is not None:
                    r.hp_raw = float(feats.hp_raw[i])
                    r.hp = float(torch.sigmoid(feats.hp_raw[i]))
                r.score = r.ict * r.hp if r.hp is not None else r.ict
            results.append(r)
        if self.cache is not None:
            self.cache.flush()
        return results

    def _score_hp(self, refs, progress, should_stop) -> list[ScoreResult]:
        if not self.has_hp:
            raise InputError("no prompt: ICT scores an image against its prompt; give the prompt, or load an HP "
                             "model to score by HP alone")
        feats = self.encode_images(None, progress=progress, should_stop=should_stop, refs=refs, with_ict=False)
        results = []
        for i, ref in enumerate(refs):
            r = ScoreResult(i, ref.label, "", error=feats.errors[i])
            if r.error is None:
                r.hp_raw = float(feats.hp_raw[i])
                r.hp = r.score = float(torch.sigmoid(feats.hp_raw[i]))
            results.append(r)
        if self.cache is not None:
            self.cache.flush()
        return results

def _zero_stats() -> dict[str, int]:
    return {"prompt_hits": 0, "prompt_misses": 0, "image_hits": 0, "image_misses": 0}
