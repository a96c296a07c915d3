"""The positive prompt of a ComfyUI API graph (the ``prompt`` text that Save Image writes into each PNG).

What is followed, from the sampler that made the image back to text:
- samplers: nodes with a linked ``positive`` input and a ``model`` input (KSampler, KSamplerAdvanced,
  SamplerCustom, CFGGuider ...), and BasicGuider's ``conditioning``. When several samplers feed the saved
  image (a hires or refiner pass), the last ones (no other sampler after them) count; those upstream of a
  Save/Preview node are preferred when the graph has others;
- conditioning: a text encoder (a node whose class names ``TextEncode``) gives its text (``text``, else
  ``text_g``, ``t5xxl``, ``clip_g``, ``clip_l``, ``prompt``); a node with ``positive`` and ``negative`` inputs
  (ControlNetApplyAdvanced ...) passes output 0 from ``positive`` and 1 from ``negative``; any other node passes
  its conditioning inputs on, and the distinct texts of several (ConditioningCombine, Concat, Average) are
  joined with ", " in input order;
- text: a literal, or a node holding one text input (PrimitiveString, a text box node), or StringConcatenate
  (joined with its delimiter).
Anything else cannot be decided from the graph alone (a text made at run time, a node that is missing, two
last samplers with different prompts, a loop): the reason is returned instead, naming the nodes.
"""
from __future__ import annotations

import json
from typing import Any

MAX_NODES = 10_000
MAX_DEPTH = 64
MAX_SAMPLERS = 64
_TEXT_FIELDS = ("text", "text_g", "t5xxl", "clip_g", "clip_l", "prompt")
_STRING_FIELDS = ("value", "text", "string", "prompt")
_COND_NAMES = ("conditioning", "conditioning_to", "conditioning_from", "conditioning_1", "conditioning_2",
               "positive", "cond")


class Undecided(Exception):
    """The text reaching a sampler cannot be read from the graph; str() says why."""


def _link(v: Any) -> tuple[str, int] | None:
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int):
        return str(v[0]), v[1]
    return None


class _Graph:
    def __init__(self, nodes: dict):
        self.nodes = {str(k): v for k, v in nodes.items() if isinstance(v, dict)}

    def node(self, nid: str) -> tuple[str, dict]:
        n = self.nodes.get(nid)
        if n is None:
            raise Undecided(f"a link points to node {nid}, which is not in the graph")
        inputs = n.get("inputs") if isinstance(n.get("inputs"), dict) else {}
        return str(n.get("class_type", "?")), inputs

    def text(self, value: Any, depth: int) -> str:
        """The string a STRING input holds."""
        if isinstance(value, str):
            return value
        link = _link(value)
        if link is None:
            raise Undecided(f"a text input holds {type(value).__name__}, not text")
        if depth > MAX_DEPTH:
            raise Undecided(f"links deeper than {MAX_DEPTH} nodes (a loop?)")
        cls, inputs = self.node(link[0])
        if cls == "StringConcatenate":
            delim = inputs.get("delimiter", "")
            return (delim if isinstance(delim, str) else "").join(
                self.text(inputs.get(k), depth + 1) for k in ("string_a", "string_b"))
        held = [k for k in _STRING_FIELDS if k in inputs]
        if len(held) == 1:
            return self.text(inputs[held[0]], depth + 1)
        raise Undecided(f"the text comes from node {link[0]} ({cls}), which makes it when the graph runs")

    def conditioning(self, link: tuple[str, int], depth: int) -> list[str]:
        """The distinct texts that reach a CONDITIONING output, in input order."""
        if depth > MAX_DEPTH:
            raise Undecided(f"links deeper than {MAX_DEPTH} nodes (a loop?)")
        nid, out = link
        cls, inputs = self.node(nid)
        if "TextEncode" in cls:
            for k in _TEXT_FIELDS:
                if k in inputs:
                    return [self.text(inputs[k], depth + 1)]
            raise Undecided(f"node {nid} ({cls}) has no text input")
        if _link(inputs.get("positive")) and _link(inputs.get("negative")):
            names = ["positive" if out == 0 else "negative"]
        else:
            names = [k for k in _COND_NAMES if _link(inputs.get(k))]
        if not names:
            raise Undecided(f"the conditioning comes from node {nid} ({cls}), whose text is not in the graph")
        texts: list[str] = []
        for k in names:
            texts.extend(t for t in self.conditioning(_link(inputs[k]), depth + 1) if t not in texts)
        return texts

    def parents(self, nid: str) -> list[str]:
        _, inputs = self.node(nid)
        return [link[0] for link in map(_link, inputs.values()) if link and link[0] in self.nodes]

    def upstream(self, starts) -> set[str]:
        seen, todo = set(), list(starts)
        while todo:
            nid = todo.pop()
            if nid not in seen:
                seen.add(nid)
                todo.extend(self.parents(nid))
        return seen


def _positive(inputs: dict, cls: str) -> tuple[str, int] | None:
    if "model" in inputs and _link(inputs.get("positive")):
        return _link(inputs["positive"])
    return _link(inputs.get("conditioning")) if cls == "BasicGuider" else None


def graph_prompt(text: str) -> tuple[str | None, str | None]:
    """(the positive prompt text as written in the graph, None) or (None, why it cannot be decided)."""
    try:
        nodes = json.loads(text)
    except (ValueError, RecursionError):
        return None, "its ComfyUI graph is not readable JSON"
    if not isinstance(nodes, dict) or len(nodes) > MAX_NODES:
        return None, "its ComfyUI graph is not an API graph of at most 10000 nodes"
    g = _Graph(nodes)
    samplers = {nid: link for nid in g.nodes if (link := _positive(g.node(nid)[1], g.node(nid)[0]))}
    if not samplers:
        return None, "its ComfyUI graph has no sampler with a positive prompt"
    saves = [nid for nid in g.nodes if any(w in g.node(nid)[0] for w in ("Save", "Preview"))]
    feeding = set(samplers) & g.upstream(saves)
    pool = feeding or set(samplers)
    if len(pool) > MAX_SAMPLERS:
        return None, f"its ComfyUI graph has more than {MAX_SAMPLERS} samplers"
    last = sorted((s for s in pool if not any(s in g.upstream(g.parents(o)) for o in pool if o != s)), key=_order)
    try:
        texts = {s: ", ".join(g.conditioning(samplers[s], 0)) for s in last}
    except Undecided as e:
        return None, f"its ComfyUI graph does not say which text reaches the sampler: {e}"
    distinct = list(dict.fromkeys(texts.values()))
    if len(distinct) > 1:
        return None, (f"its ComfyUI graph has {len(last)} last samplers with different prompts (nodes "
                      f"{', '.join(last)})")
    return distinct[0], None


def _order(nid: str):
    return (0, int(nid), nid) if nid.isdigit() else (1, 0, nid)
