"""What users would run instead of ict_core: the model card's quick-start loop (FACTS.md), fp32.

Per image, per prompt: transformers CLIPModel + CLIPImageProcessor + open_clip's ViT-H-14 tokenizer;
on transformers 5 the projected features are `.pooler_output`, nothing else changed. The released
`.bin` files are loaded the card's way: a CLIPModel with random init stands in for
`from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")` (no network here), then torch.load +
load_state_dict(strict=False). HP follows the official eval code: its backbone's own config.json, its
image features through the MLP head, sigmoid for one image.

Written from the card for the benchmarks; deliberately separate from tests/ (same logic as tests/reference.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


def processor():
    """The PIL-backed CLIPImageProcessor (transformers 4.x's default; `CLIPImageProcessorPil` on 5.x)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil()
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor()


def features(out):
    """get_*_features: a tensor on transformers 4, an output object (projected features in .pooler_output) on 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hp_head(dim: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))


class ReferenceLoop:
    """Load with load_ict() (and load_hp()); call with PIL images and one prompt per image."""

    def __init__(self, config: dict, device: str = "cpu"):
        self.config = config
        self.device = device
        self.ict = self.hp = self.mlp = None
        self.processor = self.tokenizer = None
        self.timings: dict[str, float] = {}

    def load_ict(self, ict_folder: Path) -> None:
        from open_clip import get_tokenizer
        from transformers import CLIPConfig, CLIPModel

        t = time.perf_counter()
        self.processor = processor()
        cfg = CLIPConfig(text_config=self.config["text_config"], vision_config=self.config["vision_config"],
                         projection_dim=self.config["projection_dim"])
        self.ict = CLIPModel(cfg)                       # stands in for from_pretrained(laion): random init
        t_init = time.perf_counter()
        state = torch.load(Path(ict_folder) / "pytorch_model.bin", map_location="cpu", weights_only=True)
        t_read = time.perf_counter()
        self.ict.load_state_dict(state, strict=False)
        del state
        self.ict = self.ict.to(self.device).eval()
        self.tokenizer = get_tokenizer("ViT-H-14")
        t_end = time.perf_counter()
        self.timings.update(ict_init_s=t_init - t, ict_torch_load_s=t_read - t_init,
                            ict_load_state_dict_s=t_end - t_read)

    def load_hp(self, hp_folder: Path) -> None:
        from transformers import CLIPConfig, CLIPModel

        hp_folder = Path(hp_folder)
        t = time.perf_counter()
        hp_cfg = CLIPConfig(**json.loads((hp_folder / "hp_backbone" / "config.json").read_text()))
        self.hp = CLIPModel(hp_cfg)
        state = torch.load(hp_folder / "hp_backbone" / "pytorch_model.bin", map_location="cpu", weights_only=True)
        self.hp.load_state_dict(state, strict=False)
        del state
        self.hp = self.hp.to(self.device).eval()
        self.mlp = hp_head(self.config["projection_dim"])
        head = torch.load(hp_folder / "hp_scorer" / "mlp_pytorch_model.bin", map_location="cpu", weights_only=True)
        self.mlp.load_state_dict({k[len("layers."):]: v for k, v in head.items()})
        self.mlp = self.mlp.to(self.device).eval()
        self.timings["hp_load_s"] = time.perf_counter() - t

    def preprocess(self, image) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(np.asarray(pixels)).to(self.device)

    @torch.no_grad()
    def __call__(self, images, texts, use_hp: bool = False):
        """The card's calc_ict_scores (+ the HP head when use_hp): [(ict, hp_sigmoid|None, hp_raw|None)]."""
        pixels_list = [self.preprocess(image) for image in images]
        out = []
        for pixels, text in zip(pixels_list, texts):
            img = features(self.ict.get_image_features(pixel_values=pixels))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = features(self.ict.get_text_features(self.tokenizer(text).to(self.device)))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            ict = (txt @ img.T).squeeze().item()
            hp = raw = None
            if use_hp:
                raw = self.mlp(features(self.hp.get_image_features(pixel_values=pixels))).squeeze().item()
                hp = torch.sigmoid(torch.tensor(raw)).item()
            out.append((ict, hp, raw))
        return out
