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
    """Import ComfyUI as main.py would with --cpu; returns its nodes module."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses --cpu)
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", checkpoints)
    import nodes as comfy_nodes

    pack = load_pack()
    folder_paths.add_model_folder_path("ict", ict_dir)
    return comfy_nodes, pack


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
    loader = pack.NODE_CLASS_MAPPINGS["ICTModelLoader"]()
    ict = loader.load(job["ict_model"], job.get("hp_model", "none"), "auto", "auto")[0]
    return comfy_nodes, pack, model, vae, pos, neg, latent, ict


if __name__ == "__main__":  # python tests/comfyui_inproc.py JOB.json: runs the job's `run` function
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(ROOT / "tests"))
    module = importlib.import_module(job["module"])
    result = getattr(module, job["function"])(job)
    Path(job["out"]).write_text(json.dumps(result, indent=1))


def sampler_split_table(job: dict) -> dict:
    """For each sampler: does a run split at step s (the node's way) end on the unsplit run's latent?

    Also KSamplerAdvanced's own split (leftover noise returned, then continued without noise) for euler,
    which goes through ComfyUI's latent scaling between the halves."""
    import torch

    cn, pack, model, vae, pos, neg, latent, ict = setup(job)
    from ict_core.best_of_n import Plan, Search  # importable once the pack is loaded

    bon = sys.modules["ict_reward_pack.nodes.best_of_n"]
    steps, split, seed, cfg = job["steps"], job["split"], job["seed"], 7.0
    rows = {}
    for name in job["samplers"]:
        plain = cn.common_ksampler(model, seed, steps, cfg, name, "normal", pos, neg, latent)[0]["samples"]
        search = Search.start(Plan.build(1, 1, steps, split / steps, 1, 1), seed)
        run = bon._Run(model, seed, steps, cfg, name, "normal", pos, neg, latent, 1.0, search)
        bar = bon._Steps(model, steps)
        run.phase([0], 0, split, bar)
        out = run.phase_out([0], split, steps, bar)[0]
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


def best_of_n_acceptance(job: dict) -> dict:
    """The facts tests/test_comfyui_best_of_n.py checks: plain KSampler runs of seeds seed..seed+n-1, ICT Select
    Best over their images, and the node with and without pruning, chunk 1 and chunk n, with an audit."""
    import torch

    cn, pack, model, vae, pos, neg, latent, ict = setup(job)
    node = pack.NODE_CLASS_MAPPINGS["ICTBestOfNSampler"]()
    seed, n, steps, prompt = job["seed"], job["n"], job["steps"], job["prompt"]
    common = dict(steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
                  latent_image=latent, denoise=1.0, vae=vae, ict_model=ict, prompt=prompt, n=n, score_by="ict")
    plain = [cn.common_ksampler(model, seed + i, steps, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]
             for i in range(n)]
    images = vae.decode(torch.cat(plain))
    sel = pack.NODE_CLASS_MAPPINGS["ICTSelectBest"]().select([ict], [images], [prompt], [n], ["ict"], [-1.0])
    out = {"select_best_order": [int(i) for i in sel["result"][3].split(",")],
           "select_best_scores": sel["result"][4]}

    def run(name, **kw):
        counter = CallCounter()
        r = node.sample(counter.wrap(model), seed, **{**common, **kw})
        lat, imgs, seeds, scores, report = r["result"]
        diffs = [float((lat["samples"][j:j + 1] - plain[s - seed]).abs().max()) for j, s in enumerate(seeds)]
        same = [bool(torch.equal(lat["samples"][j:j + 1], plain[s - seed])) for j, s in enumerate(seeds)]
        out[name] = {"seeds": seeds, "scores": scores, "report": report, "ui_text": r["ui"]["text"][0],
                     "model_calls": counter.calls, "candidate_evals": counter.candidate_evals,
                     "equal_to_plain": same, "max_abs_diff_to_plain": diffs,
                     "plain_abs_max": [float(plain[s - seed].abs().max()) for s in seeds],
                     "image_shape": list(imgs.shape), "latent_shape": list(lat["samples"].shape)}

    run("no_pruning", k=n, prune_at=1.0, survivors=n, chunk=1, audit=False)
    run("pruned_chunk1_audit", k=1, prune_at=0.5, survivors=2, chunk=1, audit=True)
    run("pruned_chunk_n", k=1, prune_at=0.5, survivors=2, chunk=n, audit=False)
    return out
