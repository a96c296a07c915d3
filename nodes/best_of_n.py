"""ICTBestOfNSampler (V3 schema): seed search in one node, with a pruning funnel that users can audit.

ComfyUI glue only: ict_core.best_of_n decides (seeds, plan, survivors, audit, report); nodes.sampler_run
samples through comfy.sample; this module checks the inputs, decodes with the VAE, scores through
nodes.scoring and writes each kept image's scores into the PNG metadata of the run (nodes.records).
"""
from __future__ import annotations

import logging

from ict_core.ranking import BY

from . import adapters, records, v3
from .sampler_run import Progress, Run, keyframed_hooks
from .scoring import records_for, run_scorer
from .v3 import io

log = logging.getLogger(__name__)
NODE = "ICTBestOfNSampler"

# Measured (docs/sampler.md, tests/test_comfyui_best_of_n.py, tests/comfyui_inproc.py sampler_split_table): a run
# cut at a step and resumed ends on the unsplit run's latent with these samplers.
EXACT_SPLIT = frozenset({"euler", "heun", "dpm_2", "ddim", "euler_ancestral"})

PRUNE_AT_TIP = ("fraction of the steps after which the running candidates are scored and cut (1.0 = no pruning); "
                "several for a funnel, e.g. 0.25, 0.5 (one survivors count each). Early scores of half-denoised "
                "images rank less reliably: 0.5 with 2 survivors is conservative; run once with audit on before "
                "relying on a lower value")
SURVIVORS_TIP = ("how many candidates continue past each cut (at least k): one count per prune_at fraction, "
                 "e.g. 4, 2")
DESCRIPTION = ("Best-of-N seed search in one node: candidate i uses seed+i (a plain KSampler with that seed "
               "regenerates it). The candidates run to prune_at of the steps, the model's predicted final image "
               "is scored with ICT, the best `survivors` continue (several prune_at/survivors values: a funnel of "
               "cuts) and the best k are returned. audit: also finish the cut ones and report whether each cut "
               "keeps the true best for this model and prompt.")


def _samplers():
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:  # outside ComfyUI (unit tests): the lists only matter inside it
        return ["euler"], ["normal"]


class ICTBestOfNSampler(io.ComfyNode):
    """Samples n candidates (seed + i), cuts weak ones part-way by the ICT score of the predicted image, keeps k."""

    @classmethod
    def define_schema(cls):
        samplers, schedulers = _samplers()
        return v3.schema(
            node_id=NODE, display_name="ICT Best-of-N Sampler", description=DESCRIPTION,
            search_aliases=["best of n", "seed search", "pruning", "funnel", "ksampler reward"],
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="candidate i uses seed + i"),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=samplers),
                io.Combo.Input("scheduler", options=schedulers),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="one latent (batch 1): every candidate starts from it"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Vae.Input("vae"),
                v3.ICT_MODEL.Input("ict_model"),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "the prompt to score against (usually the positive prompt's text); empty only with "
                    "score_by hp")),
                io.Int.Input("n", default=8, min=1, max=4096, tooltip="candidates (seeds seed .. seed+n-1)"),
                io.Int.Input("k", default=1, min=1, max=4096, tooltip="how many to keep, best first"),
                io.Combo.Input("score_by", options=list(BY), default="ict"),
                # text, so that a funnel fits; a saved workflow's number (0.5, 2) arrives as its text
                io.String.Input("prune_at", default="0.5", tooltip=PRUNE_AT_TIP),
                io.String.Input("survivors", default="2", tooltip=SURVIVORS_TIP),
                io.Int.Input("chunk", default=1, min=1, max=4096, tooltip=(
                    "candidates sampled at once (VRAM). 1 reproduces a batch-1 KSampler bit for bit; larger "
                    "batches can differ in the last bits")),
                io.Boolean.Input("audit", default=False, tooltip=(
                    "also finish the cut candidates and report each cut's early/final rank correlation and "
                    "whether it would have lost the true best (costs a plain best-of-n)")),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Image.Output(display_name="images"),
                     io.Int.Output(display_name="seeds", is_output_list=True),
                     io.Float.Output(display_name="scores", is_output_list=True),
                     io.String.Output(display_name="report")],
            hidden=records.HIDDEN, is_output_node=True)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                vae, ict_model, prompt, n, k, score_by, prune_at, survivors, chunk, audit) -> io.NodeOutput:
        out = run_search(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                     vae, ict_model, prompt, n, k, score_by, prune_at, survivors, chunk, audit, cls.hidden)
        return io.NodeOutput(*out["result"], ui=v3.table_ui(out["report"]))


def _check(ict_model, score_by, prompt, n, latent_image):
    from ict_core.errors import InputError

    if not hasattr(ict_model, "scorer"):
        raise InputError(f"{NODE}: connect an ICT Model Loader to the ict_model input")
    if score_by not in BY:
        raise InputError(f"{NODE}: score_by '{score_by}' is not one of {', '.join(BY)}")
    if score_by != "ict" and not ict_model.scorer.has_hp:
        raise InputError(f"{NODE}: score_by '{score_by}' needs an HP model: choose one as hp_model in ICT Model "
                         f"Loader, or set score_by to ict")
    prompts = adapters.split_prompts(prompt, n, NODE, optional=score_by == "hp")
    if prompts is not None and len(set(prompts)) > 1:
        raise InputError(f"{NODE}: give one prompt (all candidates share it), not several separated by '---'")
    if not isinstance(latent_image, dict) or "samples" not in latent_image:
        raise InputError(f"{NODE}: latent_image must be a LATENT")
    if latent_image["samples"].shape[0] != 1:
        raise InputError(f"{NODE}: latent_image holds {latent_image['samples'].shape[0]} latents; give one (batch "
                         f"size 1: n sets the number of candidates), e.g. pick one with Latent From Batch")
    return prompts


def run_search(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise, vae,
               ict_model, prompt, n, k, score_by, prune_at, survivors, chunk, audit, hidden=None) -> dict:
    """The node's work: {"report": report, "result": (latent, images, seeds, scores, report)}."""
    import torch

    from ict_core import best_of_n as bon
    from ict_core import ranking
    from ict_core.errors import InputError

    try:
        plan = bon.Plan.build(n, k, steps, prune_at, survivors, chunk, audit)
        search = bon.Search.start(plan, seed, score_by)
    except InputError as e:
        raise InputError(f"{NODE}: {e}") from None
    prompts = _check(ict_model, score_by, prompt, n, latent_image)
    if plan.prunes and keyframed_hooks(positive, negative):
        raise InputError(f"{NODE}: the conditioning has hook keyframes, whose schedule restarts at a cut; set "
                         f"prune_at 1.0 (no pruning) or remove the keyframes")

    def score(latents: torch.Tensor):
        images = vae.decode(latents)
        if images.ndim == 5:  # video VAEs: [B,T,H,W,C]; candidates are single images
            images = images.reshape(-1, *images.shape[-3:])
        results = run_scorer(ict_model, adapters.gather_images(images, NODE),
                             None if prompts is None else prompts[:1] * images.shape[0])
        return results, ranking.values(results, score_by), images

    run = Run(model, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise, search)
    header = f"{sampler_name}/{scheduler}, {steps} steps, cfg {cfg:g}, denoise {denoise:g}"
    if run.sampled_steps == 0:
        return _unchanged(latent_image, search, score, header, ict_model, score_by, hidden)
    if audit and not plan.prunes:
        search.notes.append("audit needs a cut (a prune_at step before the last with fewer survivors than running): "
                            "nothing to audit")
    progress = Progress(model, plan.cost)
    bounds = plan.bounds
    for j in range(len(bounds) - 1):
        who = search.running(j)
        x0 = run.advance(who, bounds[j], bounds[j + 1], progress)
        if j < len(plan.cuts):
            _, vals, _ = score(torch.cat([x0[i] for i in who]))
            search.set_stage(j, dict(zip(who, vals)))
    order = sorted(search.running(len(plan.cuts)))
    results, vals, images = score(torch.cat([run.outputs[i] for i in order]))
    kept = search.set_final(dict(zip(order, vals)))
    search.notes.extend(_reproducibility(plan, sampler_name, run))
    if progress.done != plan.cost:  # e.g. a sampler that calls back more or less than once a step
        search.notes.append(f"the sampler reported {progress.done} candidate-steps, the plan {plan.cost}")
    header += (f"; sampled {progress.done} candidate-steps (counted at the sampler callback), "
               f"{run.evaluations} model evaluations")
    if run.evaluations != progress.done:
        header += f" ({run.evaluations / progress.done:.2f} per candidate-step: {sampler_name} evaluates the " \
                  f"model more than once in a step)"
    report = search.report(header)
    log.info("%s:\n%s", NODE, report)
    pos = {i: j for j, i in enumerate(order)}
    out_latent = {key: v for key, v in latent_image.items() if key not in ("samples", "batch_index")}
    out_latent["samples"] = torch.cat([run.outputs[i] for i in kept])
    out_images = images[[pos[i] for i in kept]]
    records.write(hidden, records_for(ict_model, results, score_by, vals, [pos[i] for i in kept],
                                      out_images.unbind(0)))
    return {"report": report, "result": (out_latent, out_images, [search.seeds[i] for i in kept],
                                         [float(search.final[i]) for i in kept], report)}


def _unchanged(latent_image, search, score, header, ict_model, score_by, hidden) -> dict:
    """denoise 0: KSampler samples nothing and returns the latent as it came; every candidate is that latent."""
    from ict_core.errors import InputError

    results, vals, images = score(latent_image["samples"])
    if vals[0] is None:
        raise InputError(f"{NODE}: the input image could not be scored; see the log for why")
    report = (f"{header}\ndenoise 0 samples nothing (as KSampler): the latent passes through unchanged, so all "
              f"{search.plan.n} candidates are the input image; it is returned once, scored {vals[0]:.4f} by "
              f"{score_by}")
    records.write(hidden, records_for(ict_model, results, score_by, vals, [0], images.unbind(0)))
    return {"report": report, "result": (latent_image, images, [search.seeds[0]], [float(vals[0])], report)}


def _reproducibility(plan, sampler_name: str, run) -> list[str]:
    """What a plain KSampler run of a kept seed gives, for this sampler, chunk and funnel."""
    notes = []
    if run.chunk < plan.chunk:
        notes.append(f"{run.shared_stream}, so its candidates are sampled one at a time (chunk 1 instead of "
                     f"{plan.chunk}), each with its own seed's noise")
    if plan.prunes and sampler_name not in EXACT_SPLIT:
        what = "its per-step noise" if run.noisy and not run.own_noise else "its multistep history"
        notes.append(f"{sampler_name} restarts {what} at a cut: a plain KSampler run of a kept seed gives a slightly "
                     f"different image (samplers that reproduce it: docs/sampler.md; or use prune_at 1.0)")
    elif run.chunk > 1:
        notes.append(f"a plain KSampler with a kept seed (batch-1 latent) regenerates it up to the last bits "
                     f"(chunk {run.chunk} samples in batches)")
    else:
        notes.append("a plain KSampler with a kept seed (batch-1 latent) regenerates it bit for bit")
    return notes
