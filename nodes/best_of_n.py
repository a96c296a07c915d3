"""ICTBestOfNSampler: seed search in one node, with early pruning that users can audit.

ComfyUI glue only: ict_core.best_of_n decides (seeds, plan, survivors, audit, report); this module
samples through comfy.sample, decodes with the VAE and scores through nodes.scoring.

How a candidate is split without changing it: phase 1 samples sigmas[0..s] and keeps the sampler's
own latent at step s (model space, before ComfyUI's latent_out scaling, so no rounding round trip);
phase 2 samples sigmas[s..] from exactly that latent, with the same noise, latent and mask given to
the sampler as in one run (so inpainting blends alike).  For one-step samplers (euler, heun, ...)
this equals the unsplit run; samplers that carry history between steps (dpmpp_2m, lms, ...) or draw
noise (ancestral, SDE) restart it at the split: see the README's table.
"""
from __future__ import annotations

import logging

from . import adapters, comfy_host
from .scoring import BY, CATEGORY, run_scorer

log = logging.getLogger(__name__)
NODE = "ICTBestOfNSampler"


def _samplers():
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:  # outside ComfyUI (unit tests): the lists only matter inside it
        return ["euler"], ["normal"]


class _Split:
    """A ComfyUI sampler object that samples like `inner` but can resume from / capture the sampler's latent."""

    def __init__(self, inner, resume=None):
        import comfy.samplers

        self.resume, self.latent = resume, None
        fn = inner.sampler_function

        def run(model, x, sigmas, *args, **kwargs):
            if self.resume is not None:  # the exact latent phase 1 stopped at, not the re-scaled copy
                x = self.resume.to(device=x.device, dtype=x.dtype)
            out = fn(model, x, sigmas, *args, **kwargs)
            self.latent = out.to(_intermediate())
            return out

        self.sampler = comfy.samplers.KSAMPLER(run, inner.extra_options, inner.inpaint_options)


def _intermediate():
    import comfy.model_management as mm

    return mm.intermediate_device()


class _Steps:
    """Progress across all candidates (one unit = one candidate-step), preview, Cancel, and the x0 of each step."""

    def __init__(self, model, total: int):
        import comfy.utils
        import latent_preview

        self.bar = comfy.utils.ProgressBar(total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.done, self.total, self.x0, self.width = 0, total, None, 1

    def callback(self, step, x0, x, total_steps):
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        self.x0 = x0
        self.done += self.width
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
        self.bar.update_absolute(min(self.done, self.total), self.total, preview)


class ICTBestOfNSampler:
    """Samples n candidates (seed + i), prunes weak ones part-way by the ICT score of the predicted image, keeps k."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "IMAGE", "INT", "FLOAT", "STRING")
    RETURN_NAMES = ("latent", "images", "seeds", "scores", "report")
    OUTPUT_IS_LIST = (False, False, True, True, False)
    OUTPUT_NODE = True
    FUNCTION = "sample"
    DESCRIPTION = ("Best-of-N seed search in one node: candidate i uses seed+i (a plain KSampler with that seed "
                   "regenerates it). All candidates run to prune_at of the steps, the model's predicted final image "
                   "is scored with ICT, the best `survivors` finish and the best k are returned. audit: also finish "
                   "the pruned ones and report whether pruning is safe for this model and prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _samplers()
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "candidate i uses seed + i"}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (samplers,),
            "scheduler": (schedulers,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT", {"tooltip": "one latent (batch 1): every candidate starts from it"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "vae": ("VAE",),
            "ict_model": ("ICT_MODEL",),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "the prompt to score against "
                                  "(usually the positive prompt's text); empty only with score_by hp"}),
            "n": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "candidates (seeds seed .. seed+n-1)"}),
            "k": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "how many to keep, best first"}),
            "score_by": (list(BY), {"default": "ict"}),
            "prune_at": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the steps after which candidates are scored and pruned (1.0 = no pruning). Early "
                "scores of half-denoised images rank less reliably: 0.5 with 2 survivors is conservative; run "
                "once with audit on before relying on a lower value")}),
            "survivors": ("INT", {"default": 2, "min": 1, "max": 4096,
                                  "tooltip": "how many candidates continue past the prune (at least k)"}),
            "chunk": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": (
                "candidates sampled at once (VRAM). 1 reproduces a batch-1 KSampler bit for bit; larger "
                "batches can differ in the last bits")}),
            "audit": ("BOOLEAN", {"default": False, "tooltip": (
                "also finish the pruned candidates and report the early/final rank correlation and whether "
                "pruning would have lost the true best (costs a plain best-of-n)")}),
        }}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               vae, ict_model, prompt, n, k, score_by, prune_at, survivors, chunk, audit):
        import torch

        from ict_core import best_of_n, ranking
        from ict_core.errors import InputError

        if not hasattr(ict_model, "scorer"):
            raise InputError(f"{NODE}: connect an ICT Model Loader to the ict_model input")
        if score_by not in BY:
            raise InputError(f"{NODE}: score_by '{score_by}' is not one of {', '.join(BY)}")
        if score_by != "ict" and not ict_model.scorer.has_hp:
            raise InputError(f"{NODE}: score_by '{score_by}' needs an HP model: choose one as hp_model in ICT Model "
                             f"Loader, or set score_by to ict")
        try:
            plan = best_of_n.Plan.build(n, k, steps, prune_at, survivors, chunk, audit)
            search = best_of_n.Search.start(plan, seed, score_by)
        except InputError as e:
            raise InputError(f"{NODE}: {e}") from None
        prompts = adapters.split_prompts(prompt, n, NODE, optional=score_by == "hp")
        if prompts is not None and len(set(prompts)) > 1:
            raise InputError(f"{NODE}: give one prompt (all candidates share it), not several separated by '---'")
        lat = _check_latent(latent_image)
        if audit and not plan.prunes:
            search.notes.append("audit needs pruning (prune_at < 1 and survivors < n): nothing to audit")

        run = _Run(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, lat, denoise, search)
        steps_bar = _Steps(model, plan.cost)

        def score(latents: torch.Tensor):
            images = vae.decode(latents)
            if images.ndim == 5:  # video VAEs: [B,T,H,W,C]; candidates are single images
                images = images.reshape(-1, *images.shape[-3:])
            results = run_scorer(ict_model, adapters.gather_images(images, NODE),
                                 None if prompts is None else prompts[:1] * images.shape[0])
            return ranking.values(results, score_by), images

        finals: dict[int, torch.Tensor] = {}
        if plan.prunes:
            x0 = run.phase(list(range(n)), 0, plan.step, steps_bar)
            early, _ = score(torch.cat([x0[i] for i in range(n)]))
            search.set_early(early)
            for i, out in run.phase_out(search.to_finish(), plan.step, steps, steps_bar).items():
                finals[i] = out
        else:
            run.phase(list(range(n)), 0, steps, steps_bar)
            finals = dict(run.outputs)
        order = sorted(finals)
        vals, images = score(torch.cat([finals[i] for i in order]))
        kept = search.set_final({i: v for i, v in zip(order, vals)})
        search.notes.append(_reproducibility(plan, sampler_name))
        if steps_bar.done != plan.cost:  # e.g. a sampler that calls back more or less than once a step
            search.notes.append(f"the sampler reported {steps_bar.done} candidate-steps, the plan {plan.cost}")
        header = (f"{sampler_name}/{scheduler}, {steps} steps, cfg {cfg:g}, denoise {denoise:g}; "
                  f"sampled {steps_bar.done} candidate-steps (counted at the sampler callback)")
        report = search.report(header)
        log.info("%s:\n%s", NODE, report)
        pos = {i: j for j, i in enumerate(order)}
        out_latent = {key: v for key, v in latent_image.items() if key not in ("samples", "batch_index")}
        out_latent["samples"] = torch.cat([finals[i] for i in kept])
        out_images = images[[pos[i] for i in kept]]
        return {"ui": {"text": [report]},
                "result": (out_latent, out_images, [search.seeds[i] for i in kept],
                           [float(search.final[i]) for i in kept], report)}


# Measured (README, tests/comfyui_inproc.py sampler_split_table): these end a split run on the unsplit run's latent.
EXACT_SPLIT = frozenset({"euler", "heun", "dpm_2", "ddim"})


def _reproducibility(plan, sampler_name: str) -> str:
    """What a plain KSampler run of a kept seed gives, for this sampler and chunk."""
    if plan.prunes and sampler_name not in EXACT_SPLIT:
        return (f"{sampler_name} restarts its multistep history or its noise at the split: a plain KSampler run of "
                f"a kept seed gives a slightly different image (euler, heun, dpm_2, ddim or prune_at 1.0 reproduce)")
    if plan.chunk > 1:
        return (f"a plain KSampler with a kept seed (batch-1 latent) regenerates it up to the last bits "
                f"(chunk {plan.chunk} samples in batches)")
    return "a plain KSampler with a kept seed (batch-1 latent) regenerates it bit for bit"


def _check_latent(latent) -> dict:
    from ict_core.errors import InputError

    if not isinstance(latent, dict) or "samples" not in latent:
        raise InputError(f"{NODE}: latent_image must be a LATENT")
    if latent["samples"].shape[0] != 1:
        raise InputError(f"{NODE}: latent_image holds {latent['samples'].shape[0]} latents; give one (batch size 1: "
                         f"n sets the number of candidates), e.g. pick one with Latent From Batch")
    return latent


class _Run:
    """Samples groups of candidates over a range of steps; keeps each candidate's state between phases."""

    def __init__(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise,
                 search):
        import comfy.sample
        import comfy.samplers

        self.model, self.cfg, self.positive, self.negative, self.search = model, cfg, positive, negative, search
        self.latent = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        self.batch_index = latent.get("batch_index")
        self.mask = latent.get("noise_mask")
        self.sampler_name = sampler_name
        # the same sigmas KSampler computes (denoise < 1 included)
        self.sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                              scheduler=scheduler, denoise=denoise,
                                              model_options=model.model_options).sigmas
        self.state: dict[int, object] = {}    # candidate -> sampler latent at the split (model space)
        self.outputs: dict[int, object] = {}  # candidate -> final LATENT samples

    def _noise(self, group):
        import torch

        import comfy.sample

        return torch.cat([comfy.sample.prepare_noise(self.latent, self.search.seeds[i], self.batch_index)
                          for i in group])

    def _sample(self, group, start, end, bar, resume=None):
        import comfy.sample
        import comfy.samplers

        split = _Split(comfy.samplers.sampler_object(self.sampler_name), resume)
        noise = self._noise(group)
        latent = self.latent.repeat(len(group), *([1] * (self.latent.ndim - 1)))
        sigmas = self.sigmas[start:end + 1]
        bar.width = len(group)
        out = comfy.sample.sample_custom(self.model, noise, self.cfg, split.sampler, sigmas, self.positive,
                                         self.negative, latent, noise_mask=self.mask, callback=bar.callback,
                                         disable_pbar=True, seed=self.search.seeds[group[0]])
        return out, split.latent

    def phase(self, candidates, start, end, bar) -> dict:
        """Sample candidates from step `start` to `end`; returns candidate -> x0 prediction at the last step
        (ComfyUI latent scaling, ready for the VAE)."""
        x0 = {}
        for group in self.search.plan.chunks(candidates):
            out, state = self._sample(group, start, end, bar)
            pred = self.model.model.process_latent_out(bar.x0.to(_intermediate()))
            for j, i in enumerate(group):
                self.state[i] = state[j:j + 1]
                self.outputs[i] = out[j:j + 1]
                x0[i] = pred[j:j + 1]
        return x0

    def phase_out(self, candidates, start, end, bar) -> dict:
        """Continue candidates from their kept state at step `start` to `end`, without new noise."""
        import torch

        outs = {}
        for group in self.search.plan.chunks(candidates):
            resume = torch.cat([self.state[i] for i in group])
            out, _ = self._sample(group, start, end, bar, resume=resume)
            for j, i in enumerate(group):
                outs[i] = out[j:j + 1]
        return outs
