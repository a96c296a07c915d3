"""The two stages of a --ray job, run by Ray Data: CPU tasks that read, hash, decode and crop images,
then one actor per device that holds a Scorer and scores the crops in batches.

The crop is preprocess.pixel_values' resize and centre crop, stopped before its x/255 and
normalisation: after PIL-style resizing every value is a whole number in 0..255, so the crop is exactly
a uint8 224x224 image, a quarter of the float bytes to ship, and the Scorer, given it, preprocesses
it to the same pixel values bit for bit (a 224x224 image is neither resized nor cropped again).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .. import preprocess
from ..errors import InputError
from ..files import MAX_IMAGE_BYTES, read_regular
from . import output
from .inputs import is_uri

log = logging.getLogger(__name__)
SIZE = preprocess.SIZE


def crop_uint8(img: torch.Tensor) -> torch.Tensor:
    """uint8 [3,H,W] -> uint8 [3,224,224]: pixel_values() up to (not including) its normalisation."""
    return preprocess.crop_values(img.unsqueeze(0))[0].to(torch.uint8)


def read_bytes(path: str) -> bytes:
    """A local file (the plain path's bounded reader: a FIFO, a device or a file over files.MAX_IMAGE_BYTES is
    one error, never read whole), or a URI any pyarrow filesystem understands (s3://, gs://, hdfs://,
    file://), read up to the same bound."""
    if not is_uri(path):
        return read_regular(path)
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{path}: more than the {MAX_IMAGE_BYTES >> 20:,} MiB an image file may have")
    return data


def prepare(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """CPU stage: read each input once, hash and crop it to uint8 224x224. An image that cannot be read
    keeps its row with `error` set (and zero pixels, never scored). Paths arrive as bytes (os.fsencode)
    and leave as output.shown() text."""
    from ..errors import ICTError

    torch.set_num_threads(1)  # one Ray task per CPU
    keep: dict[str, list] = {"index": [], "path": [], "hash": [], "error": [], "pixels": []}
    blank = np.zeros((3, SIZE, SIZE), np.uint8)
    for index, raw in zip(batch["index"], batch["path"]):
        path = os.fsdecode(bytes(raw)) if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        digest, error, pixels = None, None, blank
        try:  # the plain path's image, of the bytes read now: decoded and hashed from them, never read again
            ref = preprocess.bytes_ref(path, read_bytes(path))
            digest = ref.digest()
            pixels = crop_uint8(ref.load()).numpy()  # load(): the plain path's checks and error text
        except OSError as e:
            error = f"{path}: file not found" if isinstance(e, FileNotFoundError) else (
                f"{path}: {e.strerror}" if e.strerror else str(e))  # open_regular's own text names the path
        except ICTError as e:
            error = str(e)
        keep["index"].append(int(index))
        keep["path"].append(output.shown(path))
        keep["hash"].append(digest)
        keep["error"].append(None if error is None else output.shown(error))
        keep["pixels"].append(pixels)
    if keep["index"]:
        out = {k: np.array(v, dtype=object) for k, v in keep.items() if k != "pixels"}
        out["index"] = np.array(keep["index"], dtype=np.int64)
        out["pixels"] = np.stack(keep["pixels"])
        yield out


class ScoreActor:
    """One Scorer per actor (one per GPU, or a CPU worker): the weights are loaded once, then every
    batch goes through Scorer.score (ict score) or Scorer.encode_images (ict index)."""

    def __init__(self, command: str, ict: str, hp: str | None, prompt: str | None, device: str = "auto",
                 precision: str = "auto", config: str | None = None, threads: int | None = None):
        from ..scorer import Scorer

        if threads:
            torch.set_num_threads(threads)
        self.command, self.prompt = command, prompt
        self.scorer = Scorer.load(ict, hp, device=device, precision=precision, cache=None, config=config)
        log.info("actor ready: %s on %s", command, self.scorer.device)

    def __call__(self, batch: dict[str, np.ndarray]):
        n = len(batch["index"])
        rows: dict[str, list[Any]] = {"index": [int(x) for x in batch["index"]],
                                      **{c: [_text(v) for v in batch[c]] for c in ("path", "hash", "error")}}
        ok = [i for i in range(n) if rows["error"][i] is None]
        crops = [torch.from_numpy(np.array(batch["pixels"][i])) for i in ok]
        if self.command == "score":
            cols = {c: [None] * n for c in ("prompt", "ict", "hp", "hp_raw", "score")}
            for i, r in zip(ok, self.scorer.score(crops, self.prompt) if crops else []):
                cols["prompt"][i] = r.prompt or None
                cols["ict"][i], cols["hp"][i], cols["hp_raw"][i], cols["score"][i] = r.ict, r.hp, r.hp_raw, r.score
                rows["error"][i] = r.error
            rows.update(cols)
            return _table(rows, output.schema("score"))
        dim = self.scorer.modules.ict.visual_projection.out_features
        emb = np.full((n, dim), math.nan, np.float32)
        hp_raw: list[float | None] = [None] * n
        if crops:
            feats = self.scorer.encode_images(crops)
            emb[ok] = feats.ict.numpy()
            for j, i in enumerate(ok):
                rows["error"][i] = rows["error"][i] or feats.errors[j]
                if feats.hp_raw is not None:
                    hp_raw[i] = float(feats.hp_raw[j])
        rows["gallery"] = [self.scorer.gallery_key] * n
        rows["embedding"] = [None if rows["error"][i] is not None else emb[i] for i in range(n)]
        rows["hp_raw"] = hp_raw
        return _table(rows, output.schema("index"))


def _text(v) -> str | None:
    """A string cell as Ray hands it over: a column of only nulls arrives as NaN floats."""
    return None if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)) else str(v)


def _table(rows: dict[str, list], schema):
    import pyarrow as pa

    return pa.Table.from_pydict({f.name: rows[f.name] for f in schema}, schema=schema)
