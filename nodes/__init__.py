"""The ComfyUI nodes of ict-reward; importing this loads no model (the V3 pattern: nodes/v3.py)."""
from __future__ import annotations

from . import comfy_host, records, v3
from .best_of_n import ICTBestOfNSampler
from .loader import ICTModelLoader
from .scoring import ICTRerank, ICTScore, ICTSelectBest

NODES = [ICTModelLoader, ICTScore, ICTSelectBest, ICTRerank, ICTBestOfNSampler]
# id -> class and id -> display name, as ComfyUI lists them (tests and the in-process harness read these)
NODE_CLASS_MAPPINGS = {v3.node_id(c): c for c in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {v3.node_id(c): v3.display_name(c) for c in NODES}


def comfy_entrypoint() -> v3.Extension:
    """ComfyUI's V3 entry point: the pack's node classes."""
    return v3.Extension(NODES)


records.NODE_TYPES.update(NODE_CLASS_MAPPINGS)
comfy_host.register_model_folder()  # cheap: a dict entry in folder_paths; no-op outside ComfyUI
records.install()                   # the /prompt hook for cached ICT nodes; no-op outside ComfyUI

__all__ = ["NODES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
