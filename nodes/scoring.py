"""ICTScore, ICTSelectBest, ICTRerank (V3 nodes): thin adapters from ComfyUI values to ict_core's Scorer and ranking."""
from __future__ import annotations

import logging
import math

from ict_core.ranking import BY

from . import adapters, comfy_host, records, v3
from .adapters import one
from .v3 import CATEGORY, io  # noqa: F401  (CATEGORY: nodes/best_of_n.py imports it from here)

log = logging.getLogger(__name__)

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
    """The score table the node shows (web/ict_scores.js), rows in output order; `rank` is the image's rank
    by `by`, `index` its position in the input batch."""
    rank_of = ranks(results, by)
    rows = []
    for i in order:
        r = results[i]
        rows.append({"rank": rank_of[i], "index": i, "ict": _fmt(r.ict), "hp": _fmt(r.hp),
                     "value": _fmt(values[i]), "picked": i in picked, "prompt": r.prompt[:80], "error": r.error})
    return {"by": by, "has_hp": any(r.hp is not None for r in results), "rows": rows, "notes": list(notes)}


def records_for(model, results, by: str, values, idx: list[int], pictures) -> list[dict]:
    """The ict_core.metadata records of the images a node outputs (`pictures[j]` is input image `idx[j]`);
    each names the 8-bit pixels Save Image writes for it, so a saved file finds its own."""
    from ict_core import metadata

    rank_of = ranks(results, by)
    return [metadata.record(results[i], by=by, value=values[i], rank=rank_of[i], model=model.ict_name,
                            hp_model=model.hp_name, precision=model.precision,
                            pixels=metadata.pixel_digest(adapters.saved_pixels(pic)))
            for i, pic in zip(idx, pictures)]


def _scores(vals) -> list[float]:
    return [float("nan") if v is None else float(v) for v in vals]


def _model_in():
    return v3.ICT_MODEL.Input("model", tooltip="from ICT Model Loader")


def _images_in():
    return io.Image.Input("images", tooltip="the images to score; a list of batches of different sizes works too")


def _prompt_in():
    return io.String.Input("prompt", multiline=True, default="", tooltip=_PROMPT_TIP)


NO_MIN = -1.0  # min_score at its minimum keeps every image (a cosine is never below -1)
_ALIASES = ["reward", "image reward", "aesthetic", "preference", "clip score", "rank images", "best of n", "ict",
            "hp"]


class ICTScore(io.ComfyNode):
    """Scores every image against its prompt; the scores also show on the node."""

    @classmethod
    def define_schema(cls):
        return v3.schema(
            node_id="ICTScore", display_name="ICT Score",
            description="ICT score (x HP when an HP model is loaded) of each image; one FLOAT per image, in input "
                        "order.",
            search_aliases=_ALIASES + ["score images"],
            inputs=[_model_in(), _images_in(), _prompt_in()],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True, tooltip="one score per image"),
                     io.String.Output(display_name="report", tooltip="the table shown on the node, as text")],
            hidden=records.HIDDEN, is_input_list=True, is_output_node=True)

    @classmethod
    def execute(cls, model, images, prompt) -> io.NodeOutput:
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
        records.write(cls.hidden, records_for(m, results, by, vals, list(range(len(imgs))), imgs.items))
        log.info("%s: scored %d images\n%s", node, len(results), report)
        return io.NodeOutput(_scores(vals), report, ui=v3.table_ui(report, tab))


def _picker_schema(node_id: str, display_name: str, description: str, aliases: list[str], with_k: bool,
                   order_name: str):
    inputs = [_model_in(), _images_in(), _prompt_in()]
    if with_k:
        inputs.append(io.Int.Input("k", default=1, min=1, max=4096, tooltip="how many images to keep, best first"))
    inputs.append(io.Combo.Input("score_by", options=list(BY), default="ict", tooltip=(
        "ict: prompt match; hp: preference (HP model); ict*hp: the paper's reward; group: ict x softmax of HP over "
        "the images of one prompt (the official evaluation rule)")))
    if with_k:
        inputs.append(io.Float.Input("min_score", default=NO_MIN, min=NO_MIN, max=1.0, step=0.001, tooltip=(
            "keep only images scoring at least this by score_by; -1 (the default) keeps every image. If none "
            "reaches it, the single best is kept and the report says so")))
    inputs += [
        io.Latent.Input("latent", optional=True,
                        tooltip="the latents of the images, picked alike (for a second sampling pass)"),
        io.Mask.Input("mask", optional=True, tooltip="one mask per image, picked alike (a single mask is passed "
                                                      "through)"),
    ]
    return v3.schema(
        node_id=node_id, display_name=display_name, description=description, search_aliases=_ALIASES + aliases,
        inputs=inputs,
        outputs=[io.Image.Output(display_name="images"), io.Latent.Output(display_name="latent"),
                 io.Mask.Output(display_name="mask"),
                 io.String.Output(display_name=order_name, tooltip="input indices in output order, e.g. '2,0,1'"),
                 io.Float.Output(display_name="scores", is_output_list=True, tooltip="the outputs' scores"),
                 io.String.Output(display_name="report", tooltip="the table shown on the node, as text")],
        hidden=records.HIDDEN, is_input_list=True, is_output_node=True)


def _pick(node: str, hidden, model, images, prompt, score_by, latent, mask, choose) -> io.NodeOutput:
    """Shared body of ICTSelectBest and ICTRerank: score, order, and pick images/latent/mask alike."""
    from ict_core import ranking
    from ict_core.errors import InputError

    m = _model(model, node)
    by = one(score_by, "ict")
    imgs = adapters.gather_images(images, node)
    n = len(imgs)
    prompts = adapters.split_prompts(prompt, n, node, optional=by == "hp")  # HP alone needs no prompt
    lat = adapters.gather_latent(latent, n, node)
    msk = adapters.gather_mask(mask, n, node)
    if by not in BY:
        raise InputError(f"{node}: score_by '{by}' is not one of {', '.join(BY)}")
    if by != "ict" and not m.scorer.has_hp:
        raise InputError(f"{node}: score_by '{by}' needs an HP model: choose one as hp_model in ICT Model Loader, "
                         f"or set score_by to ict")
    results = run_scorer(m, imgs, prompts)
    idx, selection = choose(results, by)
    vals = ranking.values(results, by)
    report = ranking.report(results, by, selection)
    notes = selection.notes if selection else []
    tab = table(results, by, ranking.rank(results, by), vals, picked=set(idx), notes=notes)
    out_images = imgs.take(idx, node)
    records.write(hidden, records_for(m, results, by, vals, idx, out_images.unbind(0)))
    if lat is not None:
        out_latent = adapters.take_latent(lat, idx)
    else:
        out_latent = comfy_host.blocked_output(f"{node}: its latent output is used but no latent is connected to its "
                                               f"latent input")
    if msk is not None:
        out_mask = adapters.take_mask(msk, idx)
    else:
        out_mask = comfy_host.blocked_output(f"{node}: its mask output is used but no mask is connected to its mask "
                                             f"input")
    order = ",".join(str(i) for i in idx)
    log.info("%s: %s by %s\n%s", node, order, by, report)
    return io.NodeOutput(out_images, out_latent, out_mask, order, _scores([vals[i] for i in idx]), report,
                         ui=v3.table_ui(report, tab))


class ICTSelectBest(io.ComfyNode):
    """Keeps the k best images of a batch (best first), with their latents and masks."""

    @classmethod
    def define_schema(cls):
        return _picker_schema(
            "ICTSelectBest", "ICT Select Best",
            "Best-of-N: the k best images by ICT/HP, best first; latent and mask are picked alike so a second "
            "sampling pass can start from the winners. indices: e.g. '3,0'.",
            ["select best", "pick best", "top k", "filter images"], with_k=True, order_name="indices")

    @classmethod
    def execute(cls, model, images, prompt, k, score_by, min_score, latent=None, mask=None) -> io.NodeOutput:
        from ict_core import ranking

        kk, ms = int(one(k, 1)), float(one(min_score, NO_MIN))

        def choose(results, by):
            sel = ranking.select(results, by, k=kk, min_score=None if ms <= NO_MIN else ms)
            return sel.indices, sel

        return _pick("ICTSelectBest", cls.hidden, model, images, prompt, score_by, latent, mask, choose)


class ICTRerank(io.ComfyNode):
    """Sorts the whole batch best first, with latents, masks and scores reordered alike."""

    @classmethod
    def define_schema(cls):
        return _picker_schema(
            "ICTRerank", "ICT Rerank",
            "The whole batch sorted best first by ICT/HP. order: the input indices in output order, e.g. '2,0,1'.",
            ["rerank", "sort images", "order images"], with_k=False, order_name="order")

    @classmethod
    def execute(cls, model, images, prompt, score_by, latent=None, mask=None) -> io.NodeOutput:
        from ict_core import ranking

        def choose(results, by):
            order = ranking.rank(results, by)
            failed = [i for i in order if results[i].error is not None]
            if failed:  # they stay in the output (last), so say why
                log.warning("ICTRerank: %d images could not be scored and are placed last", len(failed))
            return order, None

        return _pick("ICTRerank", cls.hidden, model, images, prompt, score_by, latent, mask, choose)
