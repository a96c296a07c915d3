"""ICTScore, ICTSelectBest, ICTRerank: thin adapters from ComfyUI values to ict_core's Scorer and ranking."""
from __future__ import annotations

import logging
import math

from . import adapters, comfy_host
from .adapters import one

log = logging.getLogger(__name__)

CATEGORY = "ICT reward"
BY = ("ict", "hp", "ict*hp", "group")

_PROMPT_TIP = ("the prompt the images were made from; several prompts for one batch: separate them by a line "
               "'---' (one per image, or each covering that many consecutive images). Empty: the images are "
               "scored by the HP model alone (score_by hp), which needs no prompt")


def _model(model, node: str):
    from ict_core.errors import InputError

    m = one(model)
    if m is None or not hasattr(m, "scorer"):
        raise InputError(f"{node}: connect an ICT Model Loader to the model input")
    return m


def _fmt(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def run_scorer(model, images: adapters.Images, prompts: list[str] | None):
    """Score with ComfyUI's progress bar and Cancel; weights moved to the run device first."""
    progress = comfy_host.Progress(len(images))
    progress.should_stop()
    model.prepare(len(images))
    results = model.scorer.score(images.for_scorer(), prompts, progress=progress.progress,
                                 should_stop=progress.should_stop)
    progress.progress(len(images), len(images))
    return results


def ranks(results, by: str) -> list[int | None]:
    """Each image's rank by `by` (1 = best), None for an image that could not be scored."""
    from ict_core import ranking

    out: list[int | None] = [None] * len(results)
    for pos, i in enumerate(ranking.rank(results, by)):
        out[i] = pos + 1 if results[i].error is None else None
    return out


def table(results, by: str, order: list[int], values, picked=(), notes=()) -> dict:
    """The score table sent to the node's web widget (web/ict_scores.js), rows in output order; `rank` is
    the image's rank by `by`, `index` its position in the input batch."""
    rank_of = ranks(results, by)
    rows = []
    for i in order:
        r = results[i]
        rows.append({"rank": rank_of[i], "index": i, "ict": _fmt(r.ict), "hp": _fmt(r.hp),
                     "value": _fmt(values[i]), "picked": i in picked, "prompt": r.prompt[:80], "error": r.error})
    return {"by": by, "has_hp": any(r.hp is not None for r in results), "rows": rows, "notes": list(notes)}


def record_scores(extra_pnginfo, model, results, by: str, values, idx: list[int], pictures) -> None:
    """Put the scores of the images this node outputs (`pictures[j]` is input image `idx[j]`) into the
    workflow's PNG metadata (ComfyUI's extra_pnginfo, which Save Image writes into every file of the run),
    under ict_core.metadata.KEY; each record names the 8-bit pixels it belongs to, so a saved file finds
    its own.  Without extra_pnginfo (an API client that sends none) there is nowhere to put them."""
    from ict_core import metadata

    pnginfo = one(extra_pnginfo)
    if not isinstance(pnginfo, dict):
        log.debug("no extra_pnginfo in this run: the scores are not written into saved images")
        return
    rank_of = ranks(results, by)
    recs = [metadata.record(results[i], by=by, value=values[i], rank=rank_of[i], model=model.ict_name,
                            hp_model=model.hp_name, precision=model.precision,
                            pixels=metadata.pixel_digest(adapters.saved_pixels(pic)))
            for i, pic in zip(idx, pictures)]
    pnginfo[metadata.KEY] = metadata.merge(pnginfo.get(metadata.KEY), recs)


def _ui(tab: dict, report: str) -> dict:
    return {"ict_table": [tab], "text": [report]}


def _scores(vals) -> list[float]:
    return [float("nan") if v is None else float(v) for v in vals]


class ICTScore:
    """Scores every image against its prompt; the scores also show on the node."""

    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("scores", "report")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_NODE = True
    FUNCTION = "score"
    DESCRIPTION = "ICT score (x HP when an HP model is loaded) of each image; one FLOAT per image, in input order."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("ICT_MODEL",),
            "images": ("IMAGE",),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": _PROMPT_TIP}),
        }, "hidden": {"extra_pnginfo": "EXTRA_PNGINFO"}}

    def score(self, model, images, prompt, extra_pnginfo=None):
        from ict_core import ranking

        node = "ICTScore"
        m = _model(model, node)
        imgs = adapters.gather_images(images, node)
        prompts = adapters.split_prompts(prompt, len(imgs), node, optional=m.scorer.has_hp)
        results = run_scorer(m, imgs, prompts)  # no prompt: HP alone
        by = ("ict*hp" if m.scorer.has_hp else "ict") if prompts is not None else "hp"
        vals = [r.score for r in results]
        report = ranking.report(results, by)
        tab = table(results, by, list(range(len(results))), vals)
        record_scores(extra_pnginfo, m, results, by, vals, list(range(len(imgs))), imgs.items)
        log.info("%s: scored %d images\n%s", node, len(results), report)
        return {"ui": _ui(tab, report), "result": (_scores(vals), report)}


def _select_inputs(with_k: bool) -> dict:
    req = {
        "model": ("ICT_MODEL",),
        "images": ("IMAGE",),
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": _PROMPT_TIP}),
    }
    if with_k:
        req["k"] = ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "how many images to keep, best first"})
    req["score_by"] = (list(BY), {"default": "ict", "tooltip": (
        "ict: prompt match; hp: preference (HP model); ict*hp: the paper's reward; group: ict x softmax of HP "
        "over the images of one prompt (the official evaluation rule)")})
    if with_k:
        req["min_score"] = ("FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0, "step": 0.001, "tooltip": (
            "keep only images scoring at least this; if none does, the single best is kept (the report says so)")})
    return {"required": req, "optional": {
        "latent": ("LATENT", {"tooltip": "the latents of the images, picked alike (for a second sampling pass)"}),
        "mask": ("MASK", {"tooltip": "one mask per image, picked alike (a single mask is passed through)"}),
    }, "hidden": {"extra_pnginfo": "EXTRA_PNGINFO"}}


class _Picker:
    """Shared body of ICTSelectBest and ICTRerank: score, order, and pick images/latent/mask alike."""

    NODE = ""
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "LATENT", "MASK", "STRING", "FLOAT", "STRING")
    OUTPUT_IS_LIST = (False, False, False, False, True, False)
    OUTPUT_NODE = True  # ComfyUI sends an output node's table again when it comes from the cache

    def _pick(self, model, images, prompt, score_by, latent, mask, choose, extra_pnginfo=None):
        from ict_core import ranking

        node = self.NODE
        m = _model(model, node)
        by = one(score_by, "ict")
        imgs = adapters.gather_images(images, node)
        n = len(imgs)
        prompts = adapters.split_prompts(prompt, n, node, optional=by == "hp")  # HP alone needs no prompt
        lat = adapters.gather_latent(latent, n, node)
        msk = adapters.gather_mask(mask, n, node)
        if by not in BY:
            from ict_core.errors import InputError

            raise InputError(f"{node}: score_by '{by}' is not one of {', '.join(BY)}")
        if by != "ict" and not m.scorer.has_hp:
            from ict_core.errors import InputError

            raise InputError(f"{node}: score_by '{by}' needs an HP model: choose one as hp_model in ICT Model Loader, "
                             f"or set score_by to ict")
        results = run_scorer(m, imgs, prompts)
        idx, selection = choose(results, by)
        vals = ranking.values(results, by)
        report = ranking.report(results, by, selection)
        notes = selection.notes if selection else []
        tab = table(results, by, ranking.rank(results, by), vals, picked=set(idx), notes=notes)
        out_images = imgs.take(idx, node)
        record_scores(extra_pnginfo, m, results, by, vals, idx, out_images.unbind(0))
        if lat is not None:
            out_latent = adapters.take_latent(lat, idx)
        else:
            out_latent = comfy_host.blocked_output(f"{node}: its latent output is used but no latent is connected to "
                                                   f"its latent input")
        if msk is not None:
            out_mask = adapters.take_mask(msk, idx)
        else:
            out_mask = comfy_host.blocked_output(f"{node}: its mask output is used but no mask is connected to its "
                                                 f"mask input")
        order = ",".join(str(i) for i in idx)
        log.info("%s: %s by %s\n%s", node, order, by, report)
        return {"ui": _ui(tab, report),
                "result": (out_images, out_latent, out_mask, order, _scores([vals[i] for i in idx]), report)}


class ICTSelectBest(_Picker):
    """Keeps the k best images of a batch (best first), with their latents and masks."""

    NODE = "ICTSelectBest"
    RETURN_NAMES = ("images", "latent", "mask", "indices", "scores", "report")
    FUNCTION = "select"
    DESCRIPTION = ("Best-of-N: the k best images by ICT/HP, best first; latent and mask are picked alike so a "
                   "second sampling pass can start from the winners. indices: e.g. '3,0'.")

    @classmethod
    def INPUT_TYPES(cls):
        return _select_inputs(with_k=True)

    def select(self, model, images, prompt, k, score_by, min_score, latent=None, mask=None, extra_pnginfo=None):
        from ict_core import ranking

        kk, ms = int(one(k, 1)), float(one(min_score, 0.0))

        def choose(results, by):
            sel = ranking.select(results, by, k=kk, min_score=ms)
            return sel.indices, sel

        return self._pick(model, images, prompt, score_by, latent, mask, choose, extra_pnginfo)


class ICTRerank(_Picker):
    """Sorts the whole batch best first, with latents, masks and scores reordered alike."""

    NODE = "ICTRerank"
    RETURN_NAMES = ("images", "latent", "mask", "order", "scores", "report")
    FUNCTION = "rerank"
    DESCRIPTION = "The whole batch sorted best first by ICT/HP. order: the input indices in output order, e.g. '2,0,1'."

    @classmethod
    def INPUT_TYPES(cls):
        return _select_inputs(with_k=False)

    def rerank(self, model, images, prompt, score_by, latent=None, mask=None, extra_pnginfo=None):
        from ict_core import ranking

        def choose(results, by):
            order = ranking.rank(results, by)
            failed = [i for i in order if results[i].error is not None]
            if failed:  # they stay in the output (last), so say why
                log.warning("ICTRerank: %d images could not be scored and are placed last", len(failed))
            return order, None

        return self._pick(model, images, prompt, score_by, latent, mask, choose, extra_pnginfo)
