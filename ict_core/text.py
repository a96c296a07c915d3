"""Prompts -> token ids with open_clip's ViT-H-14 tokenizer, exactly as the model card does."""
from __future__ import annotations

import functools
import logging
import unicodedata

import torch

from .errors import InputError

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77


@functools.lru_cache(maxsize=1)
def _tokenizer():
    # The built-in ViT-H-14 config names no HF tokenizer, so this is open_clip's SimpleTokenizer: no network.
    from open_clip import get_tokenizer

    return get_tokenizer("ViT-H-14")


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


def _count(prompt: str) -> int:
    tok = _tokenizer()
    encode = getattr(tok, "encode", None)
    if encode is None:  # open_clip < 2.24 returns its module-level tokenize function
        from open_clip.tokenizer import _tokenizer as simple

        encode = simple.encode
    return len(encode(prompt))


def tokenize(prompts: list[str]) -> torch.Tensor:
    """LongTensor [n, 77]; a prompt longer than 75 BPE tokens is cut (its last id set to end-of-text)."""
    tok = _tokenizer()
    for p in prompts:
        n = _count(p)
        if n > CONTEXT_LENGTH - 2:
            log.warning("prompt has %d tokens, more than the model's %d: the text after token %d is ignored "
                        "(%r...)", n, CONTEXT_LENGTH - 2, CONTEXT_LENGTH - 2, p[:60])
    return tok(prompts, context_length=CONTEXT_LENGTH)
