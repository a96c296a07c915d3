"""Test stand-in for the part of ComfyUI's `comfy_api.latest` that the pack uses, for unit tests run without
ComfyUI.  Same names and call shapes as ComfyUI 0.33's (`io.ComfyNode`, `io.Schema`, input/output types,
`io.Hidden`, `io.NodeOutput`, `ComfyExtension`); it checks what ComfyUI's schema checks (unique ids,
define_schema/execute present) and keeps every keyword an input is given.  The real one is exercised by
the real-host tests (tests/test_comfyui_integration.py)."""
from __future__ import annotations

from . import io, ui  # noqa: F401


class ComfyExtension:
    async def on_load(self) -> None:
        """Called when the extension is loaded."""

    async def get_node_list(self) -> list:
        raise NotImplementedError
