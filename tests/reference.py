"""The reference: the model card's per-image loop (FACTS.md), fp32, on the released .bin layouts.

transformers CLIPModel + CLIPImageProcessor + open_clip's ViT-H-14 tokenizer; on transformers 5 the
projected features are taken from `.pooler_output`, nothing else changed."""
from __future__ import annotations

import json
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


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def open_rgb(path):
    """PIL image as the reference receives it. 16-bit files are scaled to 8 bits first (PIL's own
    convert('RGB') would clip them to white, a bug the project does not copy). Transparent images are
    converted with PIL's convert('RGB') (alpha dropped) as transformers 4.x, which the official code ran
    on, does; transformers 5's processor composites them onto white instead."""
    from PIL import Image

    im = Image.open(path)
    if "A" in im.getbands():
        im = im.convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.floor(arr * 255 / 65535 + 0.5), 0, 255).astype(np.uint8))
    return im


class ReferenceLoop:
    def __init__(self, config: dict, ict_folder: Path, hp_folder: Path | None = None):
        from transformers import CLIPConfig, CLIPModel

        cfg = CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                         projection_dim=config["projection_dim"])
        self.ict = CLIPModel(cfg)
        sd = torch.load(ict_folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        self.ict.load_state_dict(sd, strict=False)
        self.ict.float().eval()
        self.hp = self.mlp = None
        if hp_folder is not None:
            hp_cfg = CLIPConfig(**json.loads((hp_folder / "hp_backbone" / "config.json").read_text()))
            self.hp = CLIPModel(hp_cfg)
            self.hp.load_state_dict(torch.load(hp_folder / "hp_backbone" / "pytorch_model.bin",
                                               map_location="cpu", weights_only=True), strict=False)
            self.hp.float().eval()
            dim = config["projection_dim"]
            self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2),
                                           torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                                           torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                           torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
            head = torch.load(hp_folder / "hp_scorer" / "mlp_pytorch_model.bin", map_location="cpu",
                              weights_only=True)
            self.mlp.load_state_dict({k[len("layers."):]: v for k, v in head.items()})
            self.mlp.eval()
        self.processor = processor()
        from open_clip import get_tokenizer
        self.tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def __call__(self, images, texts):
        """Per image, per prompt: (ict, hp_sigmoid or None, hp_raw or None)."""
        out = []
        for image, text in zip(images, texts):
            pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
            pixels = torch.as_tensor(np.asarray(pixels))
            img = _features(self.ict.get_image_features(pixel_values=pixels))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = _features(self.ict.get_text_features(self.tokenizer(text)))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            ict = (txt @ img.T).squeeze().item()
            hp = raw = None
            if self.hp is not None:
                raw = self.mlp(_features(self.hp.get_image_features(pixel_values=pixels))).squeeze().item()
                hp = torch.sigmoid(torch.tensor(raw)).item()
            out.append((ict, hp, raw))
        return out
