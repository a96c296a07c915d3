"""Checks of a model's tensor names and shapes against its architecture, shared by the converter (the
released checkpoints) and the loader (converted files): one place says what "does not match" means."""
from __future__ import annotations

from typing import Any

from .errors import ModelFileError

BOTH = ("text_config", "vision_config")  # the towers of a full CLIPModel (ICT, and HP's released backbone)


def describe(missing, unexpected, shaped, got, expected) -> str:
    """The first few missing, unexpected and wrongly shaped tensors, for one error line."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:4])}"
                     f"{' ...' if len(unexpected) > 4 else ''}")
    if shaped:
        parts.append("wrong shape: " + ", ".join(f"{k} {tuple(got[k])} != {tuple(expected[k])}"
                                                 for k in shaped[:4]))
    return "; ".join(parts)


def check_shapes(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str,
                 fix: str) -> None:
    """Names and shapes present == names and shapes expected, else one line naming the first differences."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(got) & set(expected) if tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or shaped:
        raise ModelFileError(f"{what} ({describe(missing, unexpected, shaped, got, expected)}); {fix}")


def check_arch_fits(arch: dict[str, Any], got: dict[str, tuple[int, ...]], towers: tuple[str, ...], what: str,
                    fix: str) -> None:
    """The architecture record against the tensors present, BEFORE a model is built from it: the layer
    counts and the sizes that shape every tensor must be those of the tensors in the file. A record of a
    few hundred bytes asking for millions of layers is refused here, without building anything; past this
    check, building the (meta-device) model costs no more than the file's own tensor list."""
    wrong = []
    for tower, prefix in (("text_config", "text_model."), ("vision_config", "vision_model.")):
        if tower not in towers:  # HP has no text tower
            continue
        c = arch[tower]
        layers = {k.split(".")[3] for k in got if k.startswith(prefix + "encoder.layers.") and k.count(".") > 3}
        h, n = c["hidden_size"], c["intermediate_size"]
        want = {prefix + "encoder.layers.0.mlp.fc1.weight": (n, h)}
        if tower == "text_config":
            want[prefix + "embeddings.token_embedding.weight"] = (c["vocab_size"], h)
            want[prefix + "embeddings.position_embedding.weight"] = (c["max_position_embeddings"], h)
            want["text_projection.weight"] = (arch["projection_dim"], h)
        else:
            p = c["patch_size"]
            want[prefix + "embeddings.patch_embedding.weight"] = (h, c["num_channels"], p, p)
            want[prefix + "embeddings.position_embedding.weight"] = ((c["image_size"] // p) ** 2 + 1, h)
            want["visual_projection.weight"] = (arch["projection_dim"], h)
        wrong += [f"wrong shape: {k} {tuple(got[k])} != {v}" for k, v in want.items()
                  if k in got and tuple(got[k]) != v]
        if len(layers) != c["num_hidden_layers"]:
            wrong.append(f"{len(layers)} {prefix[:-1]} layers where the architecture has {c['num_hidden_layers']}")
    if wrong:
        raise ModelFileError(f"{what} ({'; '.join(wrong[:3])}); {fix}")
