"""A gallery: the images indexed for one (ICT, HP) model pair at one precision, ranked for any prompt.

The workflow behind `ict index` and `ict search`, for Python callers too. The models load only when needed:
images already stored need no forward, and a prompt already cached needs no model at all (not even torch).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cache.embedding_cache import BY
from .cli_output import json_safe
from .errors import ICTError, InputError
from .files import image_files
from .weights import fingerprint  # needs no torch

log = logging.getLogger("ict_core.gallery")

#: Images encoded per round of Gallery.index; each round is stored, so an interrupted run keeps its work.
INDEX_ROUND = 64


@dataclass
class IndexReport:
    added: int = 0  # encoded and stored now
    already: int = 0  # stored before (same bytes), not encoded again
    moved: int = 0  # of those, stored under another path before: the path follows the file
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # one line per image that failed, naming it


@dataclass
class Hit:
    """One ranked image. ict: cosine with the prompt (NaN without one); hp: sigmoid of the stored HP head
    (NaN without HP); value: what was ranked by; score: ict * hp as `ict score` combines them."""
    rank: int
    image: str
    hash: str
    ict: float
    hp: float
    hp_raw: float
    value: float
    score: float

    def as_dict(self) -> dict:
        return json_safe(asdict(self))  # NaN -> None


class Gallery:
    """Index image files once, search them for any prompt. cache: an EmbeddingCache (default folder if None).
    precision and device decide the key (fp16 features are kept apart) and how a model runs when one is needed."""

    def __init__(self, ict_path, hp_path=None, *, cache=None, device: str = "auto", precision: str = "auto",
                 config=None):
        from .cache import EmbeddingCache, gallery_key, prompt_key

        self.cache = cache if cache is not None else EmbeddingCache()
        self.ict_path, self.hp_path = str(ict_path), (str(hp_path) if hp_path else None)
        self.device, self.precision, self.config, self._scorer = device, precision, config, None
        dtype = _dtype_name(precision, device)
        ict_fp = fingerprint(self.ict_path)
        self.key = gallery_key(ict_fp, self.hp_path and fingerprint(self.hp_path), dtype)
        self.prompt_key = prompt_key(ict_fp, dtype)

    def __len__(self) -> int:
        return self.cache.image_count(self.key)

    def _model(self, with_hp: bool):
        """The Scorer, loaded on first need (with HP only when asked: the text tower needs none)."""
        if self._scorer is None or (with_hp and self.hp_path and not self._scorer.has_hp):
            from .scorer import Scorer
            self._scorer = Scorer.load(self.ict_path, self.hp_path if with_hp else None, device=self.device,
                                       precision=self.precision, cache=None, config=self.config)
        return self._scorer

    def index(self, paths: Sequence[str], *, progress: Callable[[int, int], None] | None = None,
              on_error: Callable[[str], None] | None = None, wait: float = 0.0) -> IndexReport:
        """Encode the images (files, or folders searched recursively) not yet in the gallery, and store them.
        Each file is read once through preprocess.read_ref (bounded), then hashed and decoded from those
        bytes, so a file replaced meanwhile cannot put one image's features under another's hash. A content
        already stored takes the path it is indexed from now (moved). A failed image is one line to on_error
        (default: a logged warning). Each round is written before the next; ICTError when a round cannot be
        written: the cache folder fails (a cache memory-only from the start keeps the images in RAM), or
        another process holds the database's write lock for `wait` seconds more."""
        from .preprocess import read_ref

        on_error, chosen_memory = on_error or log.warning, self.cache.memory_only  # kept in RAM by choice: fine
        files, report, known = image_files(paths), IndexReport(), set()
        if progress:  # the bar starts with the work, so its rate is the real one
            progress(0, len(files))
        for start in range(0, len(files), INDEX_ROUND):
            todo = {}
            for f in files[start:start + INDEX_ROUND]:
                try:
                    ref = read_ref(f, str(Path(f).resolve()))
                except ICTError as e:
                    self._failed(report, on_error, str(e))
                    continue
                if ref.digest() not in known:
                    todo[ref.digest()] = ref
                    known.add(ref.digest())
            stored, count = self.cache.get_images(self.key, list(todo)), len(todo)
            self._follow_paths({d: todo[d].label for d in stored}, report)
            todo = {d: r for d, r in todo.items() if d not in stored or (self.hp_path and math.isnan(stored[d][1]))}
            report.already += count - len(todo)
            added = 0
            if todo:
                feats = self._model(True).encode_images(None, refs=list(todo.values()))
                entries = {d: (feats.ict[i].numpy(), None if feats.hp_raw is None else float(feats.hp_raw[i]), r.label)
                           for i, (d, r) in enumerate(todo.items()) if feats.errors[i] is None}
                for error in filter(None, feats.errors):
                    self._failed(report, on_error, error)
                self.cache.put_images(self.key, entries)
                added = len(entries)
            self._saved(report, added, chosen_memory, wait)
            report.added += added
            if progress:
                progress(min(start + INDEX_ROUND, len(files)), len(files))
        return report

    def _follow_paths(self, paths: dict, report: IndexReport) -> None:
        """Stored contents found at another path take the new one (a file moved or renamed)."""
        old = self.cache.labels(self.key, list(paths))
        moved = {d: p for d, p in paths.items() if d in old and old[d] != p}
        if moved:
            self.cache.relabel(self.key, moved)
            report.moved += len(moved)

    def _saved(self, report: IndexReport, added: int, chosen_memory: bool, wait: float) -> None:
        """Raise ICTError unless this round is written (see index)."""
        if self.cache.memory_only and not chosen_memory:  # the folder failed: stop encoding in vain
            raise ICTError(f"could not save to the cache folder {self.cache.path}: {self.cache.problem}; stopped "
                           f"with {report.added} new image(s) saved: use a writable cache folder (--cache-dir) and "
                           f"run again (saved images are not encoded again)")
        if self.cache.save(wait):
            raise ICTError(f"the cache database in {self.cache.path} stayed locked by another process's write "
                           f"past the wait ({wait:g} s); stopped with {report.added} new image(s) saved and "
                           f"{added} not saved: run again when the other process is done, or wait longer "
                           f"(--lock-wait; saved images are not encoded again)")

    @staticmethod
    def _failed(report: IndexReport, on_error, line: str) -> None:
        report.failed += 1
        report.errors.append(line)
        on_error(line)

    def prompt_vector(self, prompt: str):
        """The prompt's text feature (float32 numpy): from the prompt cache (no model, no torch), else encoded
        once and cached."""
        hit = self.cache.get_prompts(self.prompt_key, [prompt]).get(prompt)
        if hit is not None:  # text the scorer encoded (and checked) before
            return hit
        vec = self._model(False).encode_prompts([prompt])[0].numpy()  # checks the prompt
        self.cache.put_prompts(self.prompt_key, {prompt: vec})
        return vec

    def cache_prompts(self, prompts: Sequence[str], wait: float = 0.0) -> int:
        """Put the text features of these prompts into the prompt cache (each distinct one encoded once, none
        that is cached already), so a search for them needs no model; the count encoded now. ICTError when
        they cannot be written (see index)."""
        distinct = list(dict.fromkeys(prompts))
        missing = [p for p in distinct if p not in self.cache.get_prompts(self.prompt_key, distinct)]
        if missing:
            feats = self._model(False).encode_prompts(missing)
            self.cache.put_prompts(self.prompt_key, {p: feats[i].numpy() for i, p in enumerate(missing)})
        self._saved(IndexReport(), 0, self.cache.memory_only, wait)
        return len(missing)

    def search(self, prompt: str | None = None, *, top_k: int | None = None, by: str | None = None,
               exact: bool = False) -> list[Hit]:
        """The gallery ranked for a prompt (no image is encoded), best first, NaN values last. by: ict (the
        default with a prompt), hp (HP alone: the default without one) or ict*hp. exact: no IVF index (see
        EmbeddingCache.search). InputError, one line, on arguments that cannot rank this gallery."""
        from .cache.gallery_search import sigmoid

        by = search_by(prompt, top_k, by)
        if by != "ict" and self.hp_path is None:
            raise InputError(f"--by {by} needs the HP model; pass --hp-model (and index with it)")
        if len(self) == 0:
            raise InputError(self._empty_hint())
        query = None if prompt is None else self.prompt_vector(prompt)
        hits = []
        for rank, h in enumerate(self.cache.search(self.key, query, top_k=top_k, by=by, exact=exact), 1):
            hp = float(sigmoid(h.hp_raw))
            score = h.ict if math.isnan(hp) else hp if math.isnan(h.ict) else h.ict * hp
            hits.append(Hit(rank, h.label, h.hash, h.ict, hp, h.hp_raw, h.value, score))
        self.cache.flush()
        return hits

    def _empty_hint(self) -> str:
        if any(g.split("+")[0] == self.key.split("+")[0] for g in self.cache.stats()["galleries"]):
            return ("the gallery of this ICT model was indexed with " + ("an HP model; pass the same --hp-model to "
                    "search it" if self.hp_path is None else "another HP model (or none); use the same one here"))
        return (f"no images are indexed for this model in {self.cache.path}; run `ict index FOLDER` with the same "
                f"models first")


def search_by(prompt: str | None, top_k: int | None, by: str | None) -> str:
    """What a search ranks by (ict with a prompt, else hp), once its arguments are checked: no model needed."""
    by = by or ("ict" if prompt is not None else "hp")
    if by not in BY:
        raise InputError(f"by must be one of {BY}, not {by!r}")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    if prompt is None and by != "hp":
        raise InputError(f"--by {by} needs a prompt to search for; without one only --by hp ranks the gallery")
    return by


def _dtype_name(precision: str, device: str) -> str:
    """The precision a Scorer with these options runs at (part of the keys); fp32 needs no torch."""
    if precision in ("auto", "fp32"):
        return "float32"
    from .scorer import resolve_device, resolve_dtype
    return str(resolve_dtype(precision, resolve_device(device)))
