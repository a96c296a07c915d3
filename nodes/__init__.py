"""The ComfyUI nodes of ict-reward (classic node API); importing this loads no model and needs no ComfyUI."""
from __future__ import annotations

from . import comfy_host
from .best_of_n import ICTBestOfNSampler
from .loader import ICTModelLoader
from .scoring import ICTRerank, ICTScore, ICTSelectBest

NODE_CLASS_MAPPINGS = {
    "ICTModelLoader": ICTModelLoader,
    "ICTScore": ICTScore,
    "ICTSelectBest": ICTSelectBest,
    "ICTRerank": ICTRerank,
    "ICTBestOfNSampler": ICTBestOfNSampler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ICTModelLoader": "ICT Model Loader",
    "ICTScore": "ICT Score",
    "ICTSelectBest": "ICT Select Best",
    "ICTRerank": "ICT Rerank",
    "ICTBestOfNSampler": "ICT Best-of-N Sampler",
}

comfy_host.register_model_folder()  # cheap: a dict entry in folder_paths; no-op outside ComfyUI

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
