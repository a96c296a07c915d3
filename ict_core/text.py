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
        path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
        try:
            alone = importlib.util.spec_from_file_location(_ALONE, path)
            module = importlib.util.module_from_spec(alone)
            alone.loader.exec_module(module)
        except Exception as exc:  # e.g. a version whose tokenizer imports the rest of its package
            log.debug("open_clip's tokenizer module cannot be loaded alone (%s); importing open_clip", exc)
            module = None
    if module is None:
        from open_clip import tokenizer as module
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


def tokenize(prompts: list[str]) -> torch.Tensor:
    """LongTensor [n, 77]; a prompt longer than 75 BPE tokens is cut (its last id set to end-of-text)."""
    _, encode, call = _tokenizer()
    for p in prompts:
        n = len(encode(p))
        if n > CONTEXT_LENGTH - 2:
            log.warning("prompt has %d tokens, more than the model's %d: the text after token %d is ignored "
                        "(%r...)", n, CONTEXT_LENGTH - 2, CONTEXT_LENGTH - 2, p[:60])
    return call(prompts, context_length=CONTEXT_LENGTH)
