"""ComfyUI imported in this process (run with ComfyUI's Python): the pack, a checkpoint, a model-call counter.

Used by tests/test_comfyui_best_of_n.py (through a subprocess: `python tests/comfyui_inproc.py JOB.json`)
and bench/bench_best_of_n.py, to call node functions directly and compare tensors bit for bit, which
the HTTP API cannot do.  Nothing here is a test by itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def boot(comfy_dir: str, checkpoints: str, ict_dir: str):
    """Import ComfyUI as main.py would with --cpu; returns its nodes module and the pack's."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses --cpu)
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", checkpoints)
    import nodes as comfy_nodes

    load_pack()
    folder_paths.add_model_folder_path("ict", ict_dir)
    return comfy_nodes, sys.modules["ict_reward_pack.nodes"]  # its NODE_CLASS_MAPPINGS: every node, V3 or not


def load_pack():
    """The pack as ComfyUI loads a custom node folder (a package from its __init__.py)."""
    spec = importlib.util.spec_from_file_location("ict_reward_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ict_reward_pack"] = mod
    spec.loader.exec_module(mod)
    return mod


class CallCounter:
    """Counts the diffusion model's evaluations per candidate through ComfyUI's unet function wrapper.

    One call evaluates len(cond_or_uncond) conditionings for each candidate of the batch; the positive
    rows (cond_or_uncond == 0) count one evaluation per candidate, whether cond and uncond share a call."""

    def __init__(self):
        self.calls = 0
        self.candidate_evals = 0

    def wrap(self, model):
        m = model.clone()

        def wrapper(apply_model, args):
            cu = args["cond_or_uncond"]
            rows = args["input"].shape[0]
            self.calls += 1
            self.candidate_evals += rows * cu.count(0) // len(cu)
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        return m


def setup(job: dict):
    """Checkpoint, conditioning, an empty latent and the ICT model, as a workflow would make them."""
    comfy_nodes, pack = boot(job["comfy_dir"], job["checkpoints"], job["ict_dir"])
    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(job["checkpoint"])[:3]
    pos = comfy_nodes.CLIPTextEncode().encode(clip, job["prompt"])[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    size = job.get("size", 64)
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, 1)[0]
    job["clip"] = clip  # for callers that encode more prompts
    ict = call(pack.NODE_CLASS_MAPPINGS["ICTModelLoader"], ict_model=job["ict_model"],
               hp_model=job.get("hp_model", "none"), precision="auto", device="auto").result[0]
    return comfy_nodes, pack, model, vae, pos, neg, latent, ict


def call(node, hidden: dict | None = None, **inputs):
    """Run a V3 node as ComfyUI's executor does: `execute` on a class copy carrying the hidden values
    ({"extra_pnginfo": ...}); 0.33 hands those over as V3Data, 0.3.64 as a plain dict."""
    import inspect

    from comfy_api.latest import io

    values = {io.Hidden[k]: v for k, v in (hidden or {}).items()}
    takes_v3_data = "v3_data" in inspect.signature(node.PREPARE_CLASS_CLONE).parameters
    clone = node.PREPARE_CLASS_CLONE({"hidden_inputs": values} if takes_v3_data else values)
    return clone.execute(**inputs)


if __name__ == "__main__":  # python tests/comfyui_inproc.py JOB.json: runs the job's `run` function
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(ROOT / "tests"))
    module = importlib.import_module(job["module"])
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs a node
        result = getattr(module, job["function"])(job)
    Path(job["out"]).write_text(json.dumps(result, indent=1))


def node_search():
    """Patch ict_core's Search.report to keep each run's Search (its cut values and survivors), for the tests."""
    from ict_core import best_of_n as bon

    seen: list = []
    if not hasattr(bon.Search, "_orig_report"):
        bon.Search._orig_report = bon.Search.report

    def report(self, header=""):
        seen.append(self)
        return bon.Search._orig_report(self, header)

    bon.Search.report = report
    return seen


def sampler_split_table(job: dict) -> dict:
    """For each sampler: does a run cut at step s (the node's way) end on the unsplit run's latent?

    Also KSamplerAdvanced's own split (leftover noise returned, then continued without noise) for euler,
    which goes through ComfyUI's latent scaling between the halves."""
    import torch

    cn, pack, model, vae, pos, neg, latent, ict = setup(job)
    from ict_core.best_of_n import Plan, Search  # importable once the pack is loaded

    run_mod = sys.modules["ict_reward_pack.nodes.sampler_run"]
    steps, split, seed, cfg = job["steps"], job["split"], job["seed"], 7.0
    rows = {}
    for name in job["samplers"]:
        plain = cn.common_ksampler(model, seed, steps, cfg, name, "normal", pos, neg, latent)[0]["samples"]
        search = Search.start(Plan.build(2, 1, steps, split / steps, 1, 1), seed)
        run = run_mod.Run(model, steps, cfg, name, "normal", pos, neg, latent, 1.0, search)
        bar = run_mod.Progress(model, steps)
        run.advance([0], 0, split, bar)
        run.advance([0], split, steps, bar)
        out = run.outputs[0]
        rows[name] = {"equal": bool(torch.equal(out, plain)), "max_abs_diff": float((out - plain).abs().max()),
                      "plain_abs_max": float(plain.abs().max())}
        if name == "euler":
            adv = cn.KSamplerAdvanced()
            half = adv.sample(model, "enable", seed, steps, cfg, name, "normal", pos, neg, latent, 0, split,
                              "enable")[0]
            full = adv.sample(model, "disable", seed, steps, cfg, name, "normal", pos, neg, half, split, steps,
                              "disable")[0]["samples"]
            rows["euler (KSamplerAdvanced split)"] = {"equal": bool(torch.equal(full, plain)),
                                                      "max_abs_diff": float((full - plain).abs().max()),
                                                      "plain_abs_max": float(plain.abs().max())}
    return {"steps": steps, "split": split, "seed": seed, "rows": rows}


def _compare(kept_latents, seeds, plain_of) -> dict:
    import torch

    plain = [plain_of(s) for s in seeds]
    lat = [kept_latents[j:j + 1] for j in range(len(seeds))]
    return {"equal_to_plain": [bool(torch.equal(a, b)) for a, b in zip(lat, plain)],
            "max_abs_diff_to_plain": [float((a - b).abs().max()) for a, b in zip(lat, plain)],
            "plain_abs_max": [float(b.abs().max()) for b in plain]}


def best_of_n_acceptance(job: dict) -> dict:
    """The facts tests/test_comfyui_best_of_n.py checks: plain KSampler runs of seeds seed..seed+n-1, ICT Select
    Best over their images, and the node with and without pruning, chunk 1 and chunk n, with an audit; samplers
    that draw noise at chunk 2; denoise 0; heun's evaluations; a funnel; a mask with Differential Diffusion;
    hook keyframes; Save Image after the node.  Few steps and candidates (about 40 model calls): one costs
    15-180 s on the 2 shared cores."""
    import torch

    cn, pack, model, vae, pos, neg, latent, ict = setup(job)
    seen = node_search()
    node = pack.NODE_CLASS_MAPPINGS["ICTBestOfNSampler"]
    seed, n, steps, prompt, cfg = job["seed"], job["n"], job["steps"], job["prompt"], job.get("cfg", 7.0)
    common = dict(steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
                  latent_image=latent, denoise=1.0, vae=vae, ict_model=ict, prompt=prompt, n=n, score_by="ict")
    cache: dict = {}

    def plain_of(s, sampler="euler", lat=latent, mdl=model, n_steps=steps):
        key = (s, sampler, id(lat), id(mdl), n_steps)
        if key not in cache:
            cache[key] = cn.common_ksampler(mdl, s, n_steps, cfg, sampler, "normal", pos, neg, lat)[0]["samples"]
        return cache[key]

    parts = set(job.get("parts") or ("no_pruning", "denoise0", "hooks", "heun", "noise", "masked", "funnel"))
    out: dict = {}

    def run(name, sampler="euler", lat=latent, mdl=model, hidden=None, compare=True, **kw):
        counter = CallCounter()
        seen.clear()
        args = {**common, "sampler_name": sampler, "latent_image": lat, **kw}
        r = call(node, hidden, model=counter.wrap(mdl), seed=seed, **args)
        lat_out, imgs, seeds, scores, report = r.result
        search = seen[-1] if seen else None
        n_steps = args["steps"]
        out[name] = {"seeds": seeds, "scores": scores, "report": report, "ui_text": r.ui["text"][0],
                     "model_calls": counter.calls, "candidate_evals": counter.candidate_evals,
                     "image_shape": list(imgs.shape), "latent_shape": list(lat_out["samples"].shape),
                     "stage": search.stage if search else None, "alive": search.alive if search else None,
                     **(_compare(lat_out["samples"], seeds, lambda s: plain_of(s, sampler, lat, mdl, n_steps))
                        if compare else {})}
        Path(job["out"]).write_text(json.dumps(out, indent=1))  # so far: a run stopped by a time limit keeps it
        return r

    if "no_pruning" in parts:
        plain = [plain_of(seed + i) for i in range(n)]
        images = vae.decode(torch.cat(plain))
        sel = call(pack.NODE_CLASS_MAPPINGS["ICTSelectBest"], model=[ict], images=[images], prompt=[prompt], k=[n],
                   score_by=["ict"], min_score=[-1.0]).result
        out.update(select_best_order=[int(i) for i in sel[3].split(",")], select_best_scores=sel[4])
        pnginfo = {"workflow": {"nodes": []}}
        r = run("no_pruning", k=n, prune_at=1.0, survivors=n, chunk=1, audit=False,
                hidden={"extra_pnginfo": pnginfo})
        _saved(out, r, pnginfo, job)
    if "denoise0" in parts:
        r = run("denoise0", k=1, prune_at=0.5, survivors=1, chunk=1, audit=False, denoise=0.0)
        out["denoise0"]["latent_is_input"] = r.result[0] is latent or bool(
            torch.equal(r.result[0]["samples"], latent["samples"]))
    if "hooks" in parts:
        _hooks(out, node, common, model, pos, seed)
    cut = dict(k=1, prune_at=0.5, survivors=1, audit=False)
    if "heun" in parts:
        run("heun_cut", "heun", **cut, chunk=1, compare=False)
    for sampler in job.get("noise_samplers", []) if "noise" in parts else ():  # per-candidate noise, chunk 2
        run(f"noise_chunk2_{sampler}", sampler, k=2, prune_at=1.0, survivors=2, chunk=2, audit=False)
        if sampler == "euler_ancestral":  # its noise source continues across a cut
            run("noise_cut_euler_ancestral", sampler, **cut, chunk=1)
    if "masked" in parts:
        _masked(out, run, cn, latent, model)
    if "funnel" in parts:
        _funnel(out, run, pack, vae, ict, prompt, model, pos, neg, latent, seed, cfg)
    return out


def _funnel(out, run, pack, vae, ict, prompt, model, pos, neg, latent, seed, cfg):
    """A two-cut funnel over 3 candidates and 3 steps (cuts at steps 1 and 2); first each candidate's score at
    the first cut, computed independently from a plain run stopped there (x0 of its step, decoded, ICT Score)."""
    import comfy.sample
    import torch

    n, steps, first = 3, 3, 1
    scores = []
    for i in range(n):
        x0: dict = {}
        noise = comfy.sample.prepare_noise(latent["samples"], seed + i)
        comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent["samples"], last_step=first,
                            force_full_denoise=False, seed=seed + i,
                            callback=lambda st, d, x, t, x0=x0: x0.update(x0=d))
        img = vae.decode(model.model.process_latent_out(x0["x0"].to(torch.float32)))
        score = call(pack.NODE_CLASS_MAPPINGS["ICTScore"], model=[ict], images=[img], prompt=[prompt])
        scores.append(score.result[0][0])
    out["funnel_first_cut_plain"] = scores
    run("funnel", n=n, steps=steps, k=1, prune_at="0.3, 0.6", survivors="2, 1", chunk=1, audit=False, compare=False)


def _masked(out, run, cn, latent, model):
    """An inpainting latent (graded noise_mask) with Differential Diffusion, cut at half the steps."""
    import torch

    dd = sys.modules.get("comfy_extras.nodes_differential_diffusion")
    if dd is None:
        import comfy_extras.nodes_differential_diffusion as dd
    g = torch.Generator().manual_seed(5)
    base = {"samples": torch.randn(latent["samples"].shape, generator=g)}
    h, w = base["samples"].shape[-2:]
    mask = torch.linspace(0, 1, w).repeat(h, 1)[None]
    masked = cn.SetLatentNoiseMask().set_mask(base, mask)[0]
    res = dd.DifferentialDiffusion.execute(model)
    dd_model = res[0] if isinstance(res, tuple) else res.result[0]
    run("masked_dd", lat=masked, mdl=dd_model, k=1, prune_at=0.5, survivors=1, chunk=1, audit=False)


def _hooks(out, node, common, model, pos, seed):
    import comfy.hooks

    group = comfy.hooks.HookGroup()
    group.add(comfy.hooks.WeightHook())
    frames = comfy.hooks.HookKeyframeGroup()
    frames.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.0))
    frames.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=0.5))
    group.set_keyframes_on_hooks(frames)
    hooked = comfy.hooks.set_hooks_for_conditioning(pos, group)
    try:
        call(node, model=model, seed=seed, **{**common, "positive": hooked, "k": 1, "prune_at": 0.5, "survivors": 1,
                                              "chunk": 1, "audit": False})
        out["hooks"] = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test reads what was raised
        out["hooks"] = {"error": f"{type(e).__name__}: {e}"}


def _saved(out, r, pnginfo, job):
    """Save Image after the node, with the extra_pnginfo the node wrote into: each PNG's own record."""
    import folder_paths

    import nodes as comfy_nodes
    from ict_core import metadata

    folder_paths.set_output_directory(job["output_dir"])
    imgs, seeds, scores = r.result[1], r.result[2], r.result[3]
    saved = comfy_nodes.SaveImage().save_images(imgs, "ict_bon", extra_pnginfo=pnginfo)
    files = [Path(job["output_dir"]) / f["subfolder"] / f["filename"] for f in saved["ui"]["images"]]
    out["saved"] = {"seeds": seeds, "scores": scores, "own": [metadata.own_scores(str(f)) for f in files]}
