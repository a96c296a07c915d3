"""Prompts -> token ids with open_clip's ViT-H-14 tokenizer, exactly as the model card does."""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import unicodedata

import torch

from .errors import InputError

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
_ALONE = "ict_core._open_clip_tokenizer"
_FIRST_CUT, _MARGIN = 256, 64  # characters of a long word merged first; the safety margin before a cut


@functools.lru_cache(maxsize=1)
def _tokenizer() -> tuple:
    """(module, encode, tokenize) of open_clip's tokenizer module, whose `tokenize` is what
    get_tokenizer('ViT-H-14') returns (the built-in config names no HF tokenizer: SimpleTokenizer, 77 tokens).

    Why not `import open_clip`: the package imports timm and its model zoo too, ~55 MB that stay in a host's
    process after its "free memory" (ComfyUI's /free gives back models, not modules). The tokenizer module
    imports nothing else of open_clip, so unless the host has imported open_clip already, that file alone is
    loaded, under a private name (tests/test_preprocess.py: the same ids as get_tokenizer)."""
    spec = None if "open_clip" in sys.modules else importlib.util.find_spec("open_clip")
    module = None
    if spec is not None and spec.submodule_search_locations:
        try:
            module = load_alone(os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py"))
        except Exception as exc:  # e.g. a version whose tokenizer imports the rest of its package
            log.debug("open_clip's tokenizer module cannot be loaded alone (%s); importing open_clip", exc)
            module = None
    if module is None:
        from open_clip import tokenizer as module
    return parts(module)


def load_alone(path: str):
    """open_clip's tokenizer.py, executed alone under a private module name (it imports no other part of
    open_clip: ftfy, regex, torch and its vocabulary file beside it)."""
    alone = importlib.util.spec_from_file_location(_ALONE, path)
    module = importlib.util.module_from_spec(alone)
    alone.loader.exec_module(module)
    return module


def parts(module) -> tuple:
    """(module, encode, tokenize) of a tokenizer module. What is relied on, in open_clip 2.20 to 3.x
    (tests/test_tokenizer_bounds.py pins it): the module's `_tokenizer` SimpleTokenizer with `encode`,
    `bpe`, `pat`, `byte_encoder`, `encoder` (special tokens included) and `clean_fn` (>= 2.24) or the
    module's `basic_clean`/`whitespace_clean` (older); the tokenize call is the instance (>= 2.24) or the
    module's `tokenize`."""
    tok = module._tokenizer  # held by the caller: release() may drop the module's reference mid-call
    return module, tok.encode, (tok if callable(tok) else module.tokenize)  # < 2.24: a module function


def release() -> None:
    """Give back the tokenizer's tables (~18 MB) when a host frees the models; the next prompt loads them
    again. Only the module loaded alone is emptied (nothing else refers to it); open_clip's own stays."""
    if _tokenizer.cache_info().currsize:
        module, _, call = _tokenizer()
        _tokenizer.cache_clear()
        if module.__name__ == _ALONE and call is not module.tokenize:
            module.__dict__.pop("_tokenizer", None)  # freed now: the module's own cycle waits for a collection


def check_prompt(prompt: object, where: str = "prompt") -> str:
    """The prompt, unchanged, if it has at least one visible character. One made only of spaces,
    zero-width or control characters would be scored as the empty text: refused instead."""
    if not isinstance(prompt, str):
        raise InputError(f"{where} must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"{where} is empty; give the text the image should contain")
    if all(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in prompt):
        raise InputError(f"{where} has no visible characters (only zero-width, control or format characters); "
                         f"give the text the image should contain")
    return prompt


def _clean(module, tok):
    """The tokenizer's own text cleaning (ftfy, html unescape, whitespace, lower case): its `clean_fn`
    (open_clip >= 2.24), else the module functions its encode() calls (2.20-2.23)."""
    clean = getattr(tok, "clean_fn", None)
    return clean if clean is not None else (lambda t: module.whitespace_clean(module.basic_clean(t)).lower())


def _word_ids(tok, word: str, need: int) -> list[int]:
    """The first `need` BPE ids of one word, as tok.bpe(word) gives them, with bounded work.

    BPE is quadratic in a word's length, and only 75 ids are used: the word is merged in prefixes of
    256, 512, ... characters until `need` ids end at least _MARGIN characters before the cut (where a
    merge can differ from the whole word's: measured at most 8; a vocabulary entry is at most 32)."""
    cut = _FIRST_CUT
    while cut < len(word):
        pieces = tok.bpe(word[:cut]).split(" ")
        end = sum(len(p) for p in pieces[:need])
        if len(pieces) > need and end <= cut - _MARGIN:
            return [tok.encoder[p] for p in pieces[:need]]
        cut *= 2
    return [tok.encoder[p] for p in tok.bpe(word).split(" ")][:need]


def encode_head(module, tok, text: str, limit: int) -> list[int]:
    """tok.encode(text)[:limit], without encoding the words past the limit nor more of a long word than
    its first ids need (the work is bounded by `limit`, not by the text)."""
    ids: list[int] = []
    for m in tok.pat.finditer(_clean(module, tok)(text)):
        word = "".join(tok.byte_encoder[b] for b in m.group().encode("utf-8"))
        ids += _word_ids(tok, word, limit - len(ids))
        if len(ids) >= limit:
            break
    return ids


def tokenize(prompts: list[str]) -> torch.Tensor:
    """LongTensor [n, 77], open_clip's ids: [start, BPE ids..., end, 0...]; a prompt longer than 75 BPE
    ids is cut (its last id set to end-of-text), as get_tokenizer('ViT-H-14') does. Each prompt is
    encoded once, and no further than the 76 ids that tell whether it is cut."""
    return tokenize_with(_tokenizer(), prompts)


def tokenize_with(tokenizer: tuple, prompts: list[str]) -> torch.Tensor:
    """tokenize() with the (module, encode, tokenize) of parts()."""
    module, encode, _ = tokenizer
    tok = encode.__self__
    sot, eot, keep = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"], CONTEXT_LENGTH - 2
    out = torch.zeros(len(prompts), CONTEXT_LENGTH, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = encode_head(module, tok, p, keep + 1)
        if len(ids) > keep:
            log.warning("prompt has more than the model's %d tokens: the text after token %d is ignored (%r...)",
                        keep, keep, p[:60])
        row = [sot, *ids[:keep], eot]
        out[i, :len(row)] = torch.tensor(row)
    return out
