r"""Generation-prompt syntax, reduced to the plain text the reward model was trained on.

Both hosts' prompts carry attention weights (``(word:1.2)``, escapes ``\(``); the webui's also carry
extra-network tags (``<lora:x:0.8>``), prompt editing (``[a:b:10]``), alternation (``[a|b]``), ``BREAK``
and composable ``AND``; ComfyUI's ``embedding:name``. ICT scores text/image agreement, so the syntax
is removed and the words kept. The CLI scores its prompt verbatim."""
from __future__ import annotations

import re

_TAG = re.compile(r"<[^<>]*>")
_EMBEDDING = re.compile(r"\bembedding:[^\s,()\[\]]+")
_SPLIT = re.compile(r"\s+(?:BREAK|AND)(?:\s+-?\d+(?:\.\d+)?)?(?=\s|$)")     # "AND" may carry a weight
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=\))")
_EDIT = re.compile(r"\[([^\[\]]*)\]")
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ue000-\ue003]")  # control characters and the placeholders
_ESCAPES = {"\\(": "\ue000", "\\)": "\ue001", "\\[": "\ue002", "\\]": "\ue003"}


def _edit(m: re.Match) -> str:
    inner = m.group(1)
    if "|" in inner:                                   # [a|b|c]: alternates every step; keep the first
        return inner.split("|")[0]
    parts = inner.split(":")
    if len(parts) == 3:                                # [from:to:when] -> what the image ends with
        return parts[1]
    if len(parts) == 2:                                # [to:when] added, [from::when] removed
        return parts[0]
    return inner                                       # [word]: de-emphasis


def clean_prompt(text: str | None) -> str:
    """The words of a prompt without its syntax; escaped brackets (``\\(``) stay as brackets."""
    if not text:
        return ""
    s = _UNPRINTABLE.sub(" ", str(text))
    for escape, placeholder in _ESCAPES.items():
        s = s.replace(escape, placeholder)
    s = _TAG.sub(" ", s)
    s = _EMBEDDING.sub(" ", s)
    s = _SPLIT.sub(",", " " + s)
    s = _WEIGHT.sub("", s)
    for _ in range(8):                                 # nested [[a:b:3]:c:5]
        new = _EDIT.sub(_edit, s)
        if new == s:
            break
        s = new
    s = s.replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ")
    for escape, placeholder in _ESCAPES.items():
        s = s.replace(placeholder, escape[1])
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"\s*,(\s*,)+", ",", s)
    s = re.sub(r"\s+,", ",", s)
    return s.strip(" ,\n\t")
