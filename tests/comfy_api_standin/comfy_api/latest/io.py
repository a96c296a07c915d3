"""Stand-in of comfy_api.latest.io: the V3 schema types, enough to define, list and run nodes in tests."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Input:
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 **options):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self._kw = options  # default, min, max, step, multiline, options (a combo's choices), ...

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    def __getattr__(self, key):
        try:
            return self.__dict__["_kw"][key]
        except KeyError:
            raise AttributeError(key) from None


class Output:
    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False, **options):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

    @property
    def io_type(self) -> str:
        return self.Parent.io_type


def _type(io_type: str):
    inp = type("Input", (Input,), {})
    out = type("Output", (Output,), {})
    cls = type(io_type.title(), (), {"io_type": io_type, "Input": inp, "Output": out})
    inp.Parent = out.Parent = cls
    return cls


def Custom(io_type: str):  # noqa: N802  (ComfyUI's name)
    return _type(io_type)


Boolean, Int, Float, String, Combo = (_type(t) for t in ("BOOLEAN", "INT", "FLOAT", "STRING", "COMBO"))
Image, Mask, Latent, Conditioning = (_type(t) for t in ("IMAGE", "MASK", "LATENT", "CONDITIONING"))
Model, Vae, Clip, Sampler, Sigmas, Noise = (_type(t) for t in ("MODEL", "VAE", "CLIP", "SAMPLER", "SIGMAS", "NOISE"))
AnyType = _type("*")


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class HiddenHolder:
    def __init__(self, values: dict | None = None):
        for h in Hidden:  # keyed by Hidden members, as ComfyUI's executor passes them
            setattr(self, h.name, (values or {}).get(h))

    def __getattr__(self, key):
        return None


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        """ComfyUI's rule: ids are unique among the inputs, among the outputs, and between the two."""
        ins = [i.id for i in self.inputs]
        outs = [o.id for o in self.outputs if o.id is not None]
        dup = [k for k, c in (Counter(ins) + Counter(outs)).items() if c > 1]
        if dup:
            raise ValueError(f"ids must be unique, but {dup} are not")


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    hidden: HiddenHolder | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802
        schema = cls.define_schema()
        schema.validate()
        return schema

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden: dict | None):  # noqa: N802
        """As ComfyUI runs a node: a copy of the class carrying the run's hidden values."""
        return type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden)})
