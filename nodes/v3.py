"""The V3 node schema (ComfyUI's `comfy_api.latest`) as every node of the pack uses it.

ComfyUI 0.3.64 and 0.33 both ship `comfy_api.latest` with `io.ComfyNode`, `io.Schema`, `io.NodeOutput`,
`io.Hidden` and `ComfyExtension`; 0.33 adds `Schema.search_aliases`, which `schema()` drops where the
host lacks it.  Outside ComfyUI (unit tests) `comfy_api` is absent: tests/comfy_api_standin provides the
subset used here (call `tests/v3_standin.install()` before importing `nodes`).

The pattern (copy it for a node of the pack)::

    from . import records, v3
    from .v3 import io

    class ICTThing(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return v3.schema(
                node_id="ICTThing",                  # the classic id: saved workflows keep loading
                display_name="ICT Thing", description="what it does, one sentence",
                search_aliases=["reward", "best of n"],
                inputs=[io.Image.Input("images", tooltip="..."),             # the classic input names, in order
                        v3.ICT_MODEL.Input("model"),
                        io.Int.Input("k", default=1, min=1, max=4096, tooltip="...")],
                outputs=[io.Float.Output(display_name="scores", is_output_list=True),  # no id: ComfyUI numbers
                         io.String.Output(display_name="report")],                    # them (ids may not repeat
                hidden=records.HIDDEN,               # extra_pnginfo, prompt, unique_id  # an input name)
                is_input_list=True, is_output_node=True)

        @classmethod
        def execute(cls, images, model, k) -> io.NodeOutput:
            ...
            records.write(cls.hidden, recs)          # the scores into every PNG saved downstream, cached or not
            return io.NodeOutput(scores, report, ui=v3.table_ui(report, table))

- Hidden values are read from `cls.hidden` (ComfyUI runs `execute` on a per-run copy of the class
  that carries them); `validate_inputs` / `fingerprint_inputs` are classmethods taking input names.
- The UI contract with web/ict_scores.js: `ui = {"text": [report], "ict_table": [table]}` (`table_ui`);
  the page draws `ict_table` as a table and shows `text` where no table is sent.
- Registration: add the class to `nodes.NODES`; the pack root exports `comfy_entrypoint` and no
  NODE_CLASS_MAPPINGS (ComfyUI reads the entry point only where a package exports no mappings).
"""
from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)

CATEGORY = "ICT reward"
ICT_MODEL = io.Custom("ICT_MODEL")


def schema(**fields) -> Any:
    """io.Schema(category=CATEGORY, **fields), without the fields this ComfyUI's Schema lacks
    (`search_aliases` before 0.33): they only help the search box."""
    known = getattr(io.Schema, "__dataclass_fields__", None)
    if known is not None:
        fields = {k: v for k, v in fields.items() if k in known}
    fields.setdefault("category", CATEGORY)
    return io.Schema(**fields)


def table_ui(report: str, table: dict | None = None) -> dict:
    """What the node shows after a run (see web/ict_scores.js)."""
    ui: dict = {"text": [report]}
    if table is not None:
        ui["ict_table"] = [table]
    return ui


def node_id(cls) -> str:
    return cls.define_schema().node_id


def display_name(cls) -> str:
    s = cls.define_schema()
    return s.display_name or s.node_id


class Extension(ComfyExtension):
    """The pack's V3 extension: ComfyUI asks it for its node classes."""

    def __init__(self, node_classes):
        self.node_classes = list(node_classes)

    async def get_node_list(self) -> list:
        return list(self.node_classes)
