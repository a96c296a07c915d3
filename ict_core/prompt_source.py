"""The prompt an image was made with, read from the image itself (`--prompt-from-metadata`).

Sources, first found wins:
1. the pack's own ``ict_reward`` record of this image (metadata.own_scores): the prompt it was scored with,
   already without prompt syntax;
2. the A1111/Forge infotext (``parameters``: a PNG text chunk, or the EXIF UserComment of a JPEG/WebP): its
   positive prompt, split off as the webui's parse_generation_parameters does;
3. the ComfyUI API graph (``prompt`` PNG text chunk): the text that reaches the ``positive`` input of the
   sampler that made the image (comfy_graph).
Prompt syntax is removed as the nodes remove it (prompt_syntax.clean_prompt). An image without a usable
prompt gets a reason instead, one line naming the image.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import metadata
from .comfy_graph import graph_prompt
from .errors import ICTError, InputError
from .prompt_syntax import clean_prompt

log = logging.getLogger("ict_core")

# A1111's modules/infotext_utils.py: `Key: value` fields of the last line; fewer than 3 means it is prompt text.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass
class PromptFound:
    prompt: str | None      # without prompt syntax; None when there is none
    source: str | None      # "ict_reward record", "webui parameters" or "ComfyUI graph"
    error: str | None = None  # why there is no prompt (one line, naming the image)


def webui_prompt(infotext: str) -> str:
    """The positive prompt of a webui infotext: the lines before `Negative prompt:` and the parameters line."""
    *lines, last = infotext.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
    prompt = []
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            break
        prompt.append(line.strip())
    return "\n".join(prompt)


def infotext_fields(infotext: str) -> dict[str, str]:
    """The `Key: value` fields of a webui infotext's parameters line ({} when its last line has fewer than 3)."""
    last = infotext.strip().split("\n")[-1] if infotext.strip() else ""
    found = _PARAM.findall(last)
    if len(found) < 3:
        return {}
    return {k.strip(): (v[1:-1].replace('\\"', '"') if v.startswith('"') and v.endswith('"') else v.strip())
            for k, v in found}


def usable_prompt(prompt: str, where: str = "prompt") -> str:
    """The prompt, if the text model would see any text in it: refused (InputError) when empty, invisible,
    or when the tokenizer's own cleaning (ftfy, HTML entities such as &nbsp;, whitespace) leaves nothing."""
    from . import text

    text.check_prompt(prompt, where)
    module = text._tokenizer()[0]
    if not module.whitespace_clean(module.basic_clean(prompt)):
        raise InputError(f"{where} {prompt[:60]!r} is empty once the tokenizer cleans it (HTML entities such as "
                         f"&nbsp; and whitespace): give the text the image should contain")
    return prompt


def prompt_of(path: str | Path) -> PromptFound:
    """The prompt stored in one image file (see the module docstring); never raises for garbage."""
    try:
        own = metadata.own_scores(path)
        texts = metadata.read_texts(path)
    except OSError as e:
        return PromptFound(None, None, f"{path}: cannot read its metadata ({e.strerror or e})")
    candidates = []
    if own and isinstance(own.get("prompt"), str) and own["prompt"].strip():
        candidates.append((own["prompt"], "ict_reward record"))
    if texts.get("parameters", "").strip():
        candidates.append((clean_prompt(webui_prompt(texts["parameters"])), "webui parameters"))
    why = None
    if "prompt" in texts:
        raw, why = graph_prompt(texts["prompt"])
        if raw is not None:
            candidates.append((clean_prompt(raw), "ComfyUI graph"))
    for prompt, source in candidates:
        try:
            return PromptFound(usable_prompt(prompt, f"the prompt of its {source}"), source)
        except ICTError as e:
            why = str(e)
            break
    if why is None:
        why = "no prompt in its metadata (no ict_reward record, webui parameters or ComfyUI graph)"
    return PromptFound(None, candidates[0][1] if candidates else None, f"{path}: {why}; pass --prompt")


def prompts_of(paths: Sequence[str]) -> list[PromptFound]:
    return [prompt_of(p) for p in paths]
