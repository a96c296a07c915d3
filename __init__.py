"""ComfyUI entry point of the ict-reward node pack (ComfyUI imports this folder as a package).

Adds this folder to sys.path so `import ict_core` finds the engine shipped beside the nodes, and exports
the V3 entry point (`comfy_entrypoint`) and the web extension folder.  ComfyUI reads the entry point only
where a package exports no NODE_CLASS_MAPPINGS, so this exports none.  Imported as a plain module (no
parent package, e.g. by a test collector) it registers nothing and imports nothing heavy.
"""
import os
import sys

WEB_DIRECTORY = "./web"

if __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.insert(0, _here)
    from .nodes import comfy_entrypoint  # noqa: F401
