"""Samples best-of-N candidates in ComfyUI over a range of steps and resumes them later, as one unsplit run would.

How a candidate is split without changing it: every phase hands ComfyUI the whole sigma schedule, so
everything outside the sampler loop (noise scaling, the inpainting blend, Differential Diffusion's mask
thresholds, `sample_sigmas` in the transformer options) sees what an unsplit KSampler run sees; only the
sampler function runs the phase's slice of the steps.  Phase 1 keeps the sampler's own latent at the
cut (model space, before ComfyUI's latent_out scaling, so there is no rounding between phases); the next
phase starts from exactly that latent with the same noise, latent and mask.  Samplers that draw noise per
step get one noise source per candidate, seeded with its own seed (ComfyUI's default_noise_sampler or
BrownianTreeNoiseSampler, as a batch-1 run with that seed builds it), which continues across phases.
Samplers with a multistep history (dpmpp_2m, lms, ...) restart it at a cut: docs/sampler.md's table.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Samplers that draw per-step noise from comfy's default_noise_sampler(x, seed) (checked in both ComfyUI versions
# by tests/test_comfyui_best_of_n.py) ...
NOISE_DEFAULT = frozenset({"euler_ancestral"})
# ... and from BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=...): name -> cpu.  Other samplers that
# draw noise run one candidate at a time (their own noise stream, seeded like a batch-1 run).
NOISE_BROWNIAN = {"dpmpp_2m_sde": True}


def _intermediate():
    import comfy.model_management as mm

    return mm.intermediate_device()


def draws_noise(sampler_name: str) -> bool:
    """Whether the sampler takes per-step noise (a `noise_sampler` argument), by ComfyUI's own function."""
    import inspect

    import comfy.samplers

    if sampler_name in NOISE_DEFAULT or sampler_name in NOISE_BROWNIAN:
        return True
    try:
        fn = comfy.samplers.sampler_object(sampler_name).sampler_function
        return "noise_sampler" in inspect.signature(fn).parameters
    except (AttributeError, TypeError, ValueError):
        return True  # unknown: treat it as drawing noise (sampled one candidate at a time)


class Progress:
    """Progress across all candidates (one unit = one candidate-step) and the latent preview, through ComfyUI's
    latent_preview.prepare_callback, which also keeps each step's x0 prediction; Cancel between steps."""

    def __init__(self, model, total: int):
        import latent_preview

        self.total, self.done, self.width = total, 0, 1
        self.x0: dict = {}
        self._preview = latent_preview.prepare_callback(model, max(total, 1), self.x0)

    def callback(self, step, x0, x, total_steps):
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        self.done += self.width
        self._preview(min(self.done, self.total) - 1, x0, x, self.total)


class _Counted:
    """The sampler's denoiser, counting model evaluations per candidate (one call = one evaluation of each
    row, cond and uncond together); attributes go through to the denoiser."""

    def __init__(self, denoiser, run: Run):
        self.__dict__.update(_denoiser=denoiser, _run=run)

    def __call__(self, x, *args, **kwargs):
        self._run.evaluations += x.shape[0]
        return self._denoiser(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._denoiser, name)

    def __setattr__(self, name, value):
        setattr(self._denoiser, name, value)


class Run:
    """Samples groups of candidates over a range of steps; keeps each candidate's latent and noise between phases."""

    def __init__(self, model, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise, search):
        import comfy.sample
        import comfy.samplers

        self.model, self.cfg, self.positive, self.negative, self.search = model, cfg, positive, negative, search
        self.latent = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        self.batch_index = latent.get("batch_index")
        self.mask = latent.get("noise_mask")
        self.sampler_name = sampler_name
        # the same sigmas KSampler computes (denoise < 1 included; denoise 0 gives none)
        self.sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                              scheduler=scheduler, denoise=denoise,
                                              model_options=model.model_options).sigmas
        self.noisy = draws_noise(sampler_name)
        self.own_noise = sampler_name in NOISE_DEFAULT or sampler_name in NOISE_BROWNIAN
        # what would share one random stream across a batch: then candidates are sampled one at a time
        self.shared_stream = None
        if self.noisy and not self.own_noise:
            self.shared_stream = f"{sampler_name} draws per-step noise from one stream per batch"
        elif self.mask is not None and comfy.samplers.sampler_object(sampler_name).inpaint_options.get("random"):
            self.shared_stream = f"{sampler_name} draws its inpainting noise from one stream per batch"
        self.chunk = 1 if self.shared_stream else search.plan.chunk
        self.state: dict[int, object] = {}     # candidate -> sampler latent at the last cut (model space)
        self.noise_of: dict[int, object] = {}  # candidate -> its per-step noise source
        self.outputs: dict[int, object] = {}   # candidate -> final LATENT samples
        self.evaluations = 0

    @property
    def sampled_steps(self) -> int:
        """Steps the schedule holds: 0 for denoise 0 (KSampler gives no sigmas then)."""
        return max(len(self.sigmas) - 1, 0)

    def _initial_noise(self, group):
        import comfy.sample
        import torch

        return torch.cat([comfy.sample.prepare_noise(self.latent, self.search.seeds[i], self.batch_index)
                          for i in group])

    def _noise_sampler(self, group, x, sigmas):
        """One noise source per candidate, built as a batch-1 run with its seed builds it; kept across phases."""
        import comfy.k_diffusion.sampling as ks
        import torch

        for j, i in enumerate(group):
            if i in self.noise_of:
                continue
            row, seed = x[j:j + 1], self.search.seeds[i]
            if self.sampler_name in NOISE_BROWNIAN:
                smin, smax = sigmas[sigmas > 0].min(), sigmas.max()  # of the whole schedule, as unsplit
                self.noise_of[i] = ks.BrownianTreeNoiseSampler(row, smin, smax, seed=seed,
                                                               cpu=NOISE_BROWNIAN[self.sampler_name])
            else:
                self.noise_of[i] = ks.default_noise_sampler(row, seed=seed)
        sources = [self.noise_of[i] for i in group]
        return lambda sigma, sigma_next: torch.cat([f(sigma, sigma_next) for f in sources])

    def _sampler(self, group, start, end, resume, kept):
        import comfy.samplers

        inner = comfy.samplers.sampler_object(self.sampler_name)
        fn = inner.sampler_function

        def run(denoiser, x, sigmas, *args, **kwargs):
            if resume is not None:  # the exact latent the phase before stopped at, not the re-scaled copy
                x = resume.to(device=x.device, dtype=x.dtype)
            if self.own_noise:
                kwargs["noise_sampler"] = self._noise_sampler(group, x, sigmas)
            out = fn(_Counted(denoiser, self), x, sigmas[start:end + 1], *args, **kwargs)
            kept["latent"] = out.to(_intermediate())
            return out

        return comfy.samplers.KSAMPLER(run, inner.extra_options, inner.inpaint_options)

    def advance(self, candidates, start, end, progress: Progress) -> dict:
        """Sample candidates from step `start` (their kept latent, or the start) to `end`; returns candidate ->
        x0 prediction at the last step (ComfyUI latent scaling, ready for the VAE)."""
        import comfy.sample

        from ict_core.errors import InputError

        x0 = {}
        for k in range(0, len(candidates), self.chunk):
            group = list(candidates[k:k + self.chunk])
            resume = None
            if start > 0:
                import torch

                resume = torch.cat([self.state[i] for i in group])
            kept: dict = {}
            sampler = self._sampler(group, start, end, resume, kept)
            latent = self.latent.repeat(len(group), *([1] * (self.latent.ndim - 1)))
            progress.width = len(group)
            progress.x0.clear()  # a group never sees the x0 of the group before
            out = comfy.sample.sample_custom(self.model, self._initial_noise(group), self.cfg, sampler, self.sigmas,
                                             self.positive, self.negative, latent, noise_mask=self.mask,
                                             callback=progress.callback, disable_pbar=True,
                                             seed=self.search.seeds[group[0]])
            pred = progress.x0.get("x0")
            if pred is None or pred.shape[0] != len(group) or "latent" not in kept:
                raise InputError(f"ICTBestOfNSampler: the sampler {self.sampler_name} gave no prediction of the "
                                 f"image at step {end}; set prune_at 1.0 (no pruning) with it")
            pred = self.model.model.process_latent_out(pred.to(_intermediate()))
            for j, i in enumerate(group):
                self.state[i] = kept["latent"][j:j + 1]
                self.outputs[i] = out[j:j + 1]
                x0[i] = pred[j:j + 1]
        return x0


def keyframed_hooks(*conds) -> bool:
    """Whether a conditioning carries hooks with keyframes (their state restarts with each sampling call)."""
    for cond in conds:
        for entry in cond or ():
            extra = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 else None
            group = extra.get("hooks") if isinstance(extra, dict) else None
            for hook in getattr(group, "hooks", None) or ():
                frames = getattr(getattr(hook, "hook_keyframe", None), "keyframes", None)
                if frames:
                    return True
    return False
