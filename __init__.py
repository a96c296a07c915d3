"""ComfyUI entry point of the ict-reward node pack (ComfyUI imports this folder as a package).

Adds this folder to sys.path so `import ict_core` finds the engine shipped beside the nodes, and
exports the node mappings and the web extension folder.  Imported as a plain module (no parent
package, e.g. by a test collector) it registers nothing and imports nothing heavy.
"""
import os
import sys

WEB_DIRECTORY = "./web"

if __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.insert(0, _here)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # pragma: no cover - not loaded by ComfyUI
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
