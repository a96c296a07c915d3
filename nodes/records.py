"""Scores into every PNG saved downstream of an ICT node, whether the node ran or came from ComfyUI's cache.

ComfyUI's Save Image writes the run's `extra_pnginfo` dict into each PNG.  An ICT node puts its records
(ict_core.metadata: one per output image, with the digest of its 8-bit pixels) into that dict when it
runs.  ComfyUI does not run a node again whose inputs are unchanged: its outputs come from the cache
and it writes nothing.  So `write` also keeps the records, in a bounded memory, under the node's
*signature*: its class and inputs and, recursively, those of every node upstream (what decides whether
ComfyUI may take it from the cache).  A handler on ComfyUI's /prompt (`on_prompt`, installed by
`install`) puts the kept records of each ICT node of a queued workflow whose signature they match into
that workflow's `extra_pnginfo`, creating it if the client sent none.  A file finds its own record by its
pixels (`ict_core.metadata.own_scores`); a record kept for a node that does run again is replaced.

API for a node (the scoring nodes and the sampler):
- `HIDDEN`: the hidden inputs to list in the node's schema (`hidden=records.HIDDEN`);
- `write(cls.hidden, recs)`: merge `recs` into this run's extra_pnginfo and keep them for later runs;
- `install()`: once per process, from the pack's registration (nodes/__init__.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict

from .v3 import io

log = logging.getLogger(__name__)

HIDDEN = [io.Hidden.extra_pnginfo, io.Hidden.prompt, io.Hidden.unique_id]
MAX_SIGNATURES = 64          # nodes' record sets kept
MAX_RECORDS = 16384          # records kept in all (about 0.5 KB each)
MAX_PROMPT_NODES = 10000     # a larger workflow is not looked at (the handler runs before ComfyUI validates it)
NODE_TYPES: set[str] = set()  # class_type of the pack's nodes that write records (nodes/__init__.py fills it)

_kept: OrderedDict[str, list[dict]] = OrderedDict()
_lock = threading.Lock()
_installed = False


def signature(prompt, node_id) -> str | None:
    """A digest of node `node_id` of an API-format `prompt` and everything upstream of it, or None when
    the prompt is not one (bad shapes, a cycle, a missing node): then nothing is kept or added."""
    if not isinstance(prompt, dict) or len(prompt) > MAX_PROMPT_NODES:
        return None
    memo: dict[str, str] = {}
    try:
        return _sig(prompt, str(node_id), memo, set())
    except (KeyError, TypeError, ValueError, RecursionError):
        return None


def _sig(prompt: dict, nid: str, memo: dict, visiting: set) -> str:
    if nid in memo:
        return memo[nid]
    if nid in visiting:
        raise ValueError("cycle")
    node = prompt[nid]
    visiting.add(nid)
    inputs = {}
    for name, value in sorted(node["inputs"].items()):
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and \
                isinstance(value[1], int) and str(value[0]) in prompt:
            inputs[name] = ["link", _sig(prompt, str(value[0]), memo, visiting), value[1]]
        else:
            inputs[name] = value
    visiting.discard(nid)
    text = json.dumps([str(node["class_type"]), inputs], sort_keys=True, default=repr)
    memo[nid] = hashlib.sha256(text.encode()).hexdigest()
    return memo[nid]


def write(hidden, recs: list[dict]) -> None:
    """Merge `recs` into this run's extra_pnginfo (under ict_core.metadata.KEY) and keep them for runs that
    take this node from the cache.  `hidden`: the node's `cls.hidden` (extra_pnginfo, prompt, unique_id)."""
    from ict_core import metadata

    pnginfo = getattr(hidden, "extra_pnginfo", None)
    if isinstance(pnginfo, dict):
        pnginfo[metadata.KEY] = metadata.merge(pnginfo.get(metadata.KEY), recs)
    else:
        log.debug("no extra_pnginfo in this run: the scores are not written into saved images")
    sig = signature(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))
    if sig is not None:
        _keep(sig, recs)


def _keep(sig: str, recs: list[dict]) -> None:
    recs = list(recs)[-MAX_RECORDS:]
    with _lock:
        _kept.pop(sig, None)
        _kept[sig] = recs
        total = sum(len(v) for v in _kept.values())
        while len(_kept) > MAX_SIGNATURES or total > MAX_RECORDS:
            _, dropped = _kept.popitem(last=False)
            total -= len(dropped)


def kept(sig: str) -> list[dict] | None:
    with _lock:
        recs = _kept.get(sig)
        if recs is not None:
            _kept.move_to_end(sig)
        return recs


def forget() -> None:
    with _lock:
        _kept.clear()


def on_prompt(json_data):
    """ComfyUI's /prompt hook: the kept records of the queued workflow's ICT nodes into its extra_pnginfo.
    Never raises and never touches the prompt itself; returns `json_data`."""
    try:
        _add_kept(json_data)
    except Exception as e:  # a malformed request is ComfyUI's to refuse, not ours
        log.debug("ICT records not added to the queued workflow: %s", e)
    return json_data


def _add_kept(json_data) -> None:
    from ict_core import metadata

    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict) or len(prompt) > MAX_PROMPT_NODES:
        return
    ours = [nid for nid, n in prompt.items() if isinstance(n, dict) and n.get("class_type") in NODE_TYPES]
    if not ours:
        return
    extra = json_data.setdefault("extra_data", {})
    if not isinstance(extra, dict):
        return
    pnginfo = extra.get("extra_pnginfo")
    if pnginfo is None:  # an API client that sends none: the scores still go into its saved images
        pnginfo = extra["extra_pnginfo"] = {}
    if not isinstance(pnginfo, dict):
        return
    for nid in ours:
        sig = signature(prompt, nid)
        recs = kept(sig) if sig is not None else None
        if recs:
            pnginfo[metadata.KEY] = metadata.merge(pnginfo.get(metadata.KEY), recs)


def install() -> None:
    """Register `on_prompt` with ComfyUI's server (once; nothing to do outside ComfyUI)."""
    global _installed
    if _installed:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None or not hasattr(instance, "add_on_prompt_handler"):
        return
    instance.add_on_prompt_handler(on_prompt)
    _installed = True
