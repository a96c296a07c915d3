"""ICT Best-of-N Sampler inside a real ComfyUI (0.3.64 and 0.33.0 tested), with a random-weight SD1.5 checkpoint.

Runs only with $COMFYUI_DIR (and $COMFYUI_PYTHON) set, like tests/test_comfyui_integration.py, plus
$COMFYUI_CHECKPOINT: an SD1.5 .safetensors (../shared/hosts/make_sd15_comfy.py makes a random one).
Two parts: the node called in ComfyUI's own process (tests/comfyui_inproc.py) so latents are compared
bit for bit and model calls counted with a unet wrapper; and the example workflow through /prompt.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser import page_server, shots  # noqa: F401  (fixtures of the page test below)
from test_comfyui_integration import COMFYUI_DIR, PACK, ROOT, SKIP_REASON, serve

CHECKPOINT = os.environ.get("COMFYUI_CHECKPOINT")
PROMPT = "a red fox in the snow"
SEED, N, STEPS = 100, 2, 2  # few candidates and steps: a model call costs 15-180 s on 2 shared CPU cores
# samplers that draw noise per step: each candidate gets its own seed's noise source (nodes/sampler_run.py)
NOISE_SAMPLERS = ["euler_ancestral", "dpmpp_2m_sde"]
# the in-process run's time limit (s); what it did not reach by then is skipped, and says so.  ICT_BON_PARTS (e.g.
# "funnel,masked") runs only those parts (tests/comfyui_inproc.py best_of_n_acceptance), the others skip.
TIME_LIMIT = int(os.environ.get("ICT_BON_TIME_LIMIT", "3600"))


def _need_comfyui():
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    if not CHECKPOINT or not Path(CHECKPOINT).is_file():
        pytest.skip("COMFYUI_CHECKPOINT is not set to an SD1.5 .safetensors (make_sd15_comfy.py makes one)")


def _ict_dir(tmp: Path, tiny_models) -> Path:
    d = tmp / "ict_models"
    d.mkdir(exist_ok=True)
    shutil.copy(tiny_models.ict, d / "ict.safetensors")
    shutil.copy(tiny_models.hp, d / "hp.safetensors")
    return d


@pytest.fixture(scope="module")
def facts(tmp_path_factory, tiny_models):
    """One in-process ComfyUI run collecting what the tests below check (about 40 model calls at 64x64);
    ICT_BON_FACTS names the facts file of an earlier (or still running) run to check instead."""
    if os.environ.get("ICT_BON_FACTS"):
        return json.loads(Path(os.environ["ICT_BON_FACTS"]).read_text())
    _need_comfyui()
    tmp = tmp_path_factory.mktemp("bon_inproc")
    job = {"comfy_dir": COMFYUI_DIR, "checkpoints": str(Path(CHECKPOINT).parent), "checkpoint": Path(CHECKPOINT).name,
           "ict_dir": str(_ict_dir(tmp, tiny_models)), "ict_model": "ict.safetensors", "prompt": PROMPT,
           "seed": SEED, "n": N, "steps": STEPS, "module": "comfyui_inproc", "function": "best_of_n_acceptance",
           "out": str(tmp / "facts.json"), "noise_samplers": NOISE_SAMPLERS, "output_dir": str(tmp / "output"),
           "cfg": 1.0, "parts": [p for p in os.environ.get("ICT_BON_PARTS", "").split(",") if p]}
    (tmp / "job.json").write_text(json.dumps(job))
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ICT_CACHE_DIR=str(tmp / "cache"))
    try:
        p = subprocess.run([py, str(ROOT / "tests" / "comfyui_inproc.py"), str(tmp / "job.json")], env=env,
                           capture_output=True, text=True, timeout=TIME_LIMIT)
        assert p.returncode == 0, p.stderr[-4000:]
    except subprocess.TimeoutExpired:  # the facts gathered so far are in the file
        pass
    return json.loads((tmp / "facts.json").read_text()) if (tmp / "facts.json").is_file() else {}


def fact(facts, name):
    if name not in facts:
        pytest.skip(f"the in-process run did not reach '{name}' within ICT_BON_TIME_LIMIT={TIME_LIMIT} s")
    return facts[name]


def test_without_pruning_the_pick_equals_ict_select_best_over_the_same_images(facts):
    r = fact(facts, "no_pruning")
    assert [s - SEED for s in r["seeds"]] == facts["select_best_order"]
    assert r["scores"] == pytest.approx(facts["select_best_scores"], abs=1e-6)
    assert r["equal_to_plain"] == [True] * N  # every candidate is its seed's plain run, bit for bit
    assert "no pruning (prune_at 1.0: no cut)" in r["report"] and "regenerates it bit for bit" in r["report"]
    assert r["candidate_evals"] == N * STEPS
    assert f"sampled {N * STEPS} candidate-steps (counted at the sampler callback), {N * STEPS} model " \
           f"evaluations" in r["report"]
    assert r["latent_shape"] == [N, 4, 8, 8] and r["image_shape"] == [N, 64, 64, 3]


def test_save_image_after_the_node_writes_each_images_own_record(facts):
    r = fact(facts, "saved")
    assert len(r["own"]) == N and all(r["own"])
    assert [o["value"] for o in r["own"]] == pytest.approx(r["scores"], abs=1e-6)
    assert {o["model"] for o in r["own"]} == {"ict.safetensors"}


def test_denoise_0_returns_the_input_latent(facts):
    r = fact(facts, "denoise0")
    assert r["latent_is_input"] and r["candidate_evals"] == 0 and r["seeds"] == [SEED]
    assert "denoise 0 samples nothing (as KSampler)" in r["report"]


def test_hook_keyframes_with_pruning_are_refused_in_one_line(facts):
    err = fact(facts, "hooks")["error"]
    assert err and err.startswith("InputError: ICTBestOfNSampler: the conditioning has hook keyframes")
    assert "\n" not in err


def test_heun_reports_its_model_evaluations(facts):
    """heun evaluates the model twice a step, once on the last step (to sigma 0): 2 steps cut at 1, 2 candidates
    x 1 step x 2, then 1 survivor x 1 step x 1 = 5 evaluations for 3 candidate-steps."""
    r = fact(facts, "heun_cut")
    assert r["candidate_evals"] == 5
    assert "sampled 3 candidate-steps (counted at the sampler callback), 5 model evaluations" in r["report"]


@pytest.mark.parametrize("sampler", NOISE_SAMPLERS)
def test_noise_drawing_samplers_give_each_candidate_its_own_seeds_noise_at_chunk_2(facts, sampler):
    """Without pruning, each kept seed is its plain KSampler run: bit for bit, or within the last bits that a
    batch of 2 can change (as for euler), not the 0.6 of one noise stream shared by the batch."""
    r = fact(facts, f"noise_chunk2_{sampler}")
    assert sorted(r["seeds"]) == [SEED, SEED + 1]
    print(f"{sampler} chunk 2: max |kept - plain| = {max(r['max_abs_diff_to_plain']):.3g} of values up to "
          f"{max(r['plain_abs_max']):.3g} (bit-exact {r['equal_to_plain']})")
    assert max(r["max_abs_diff_to_plain"]) <= 1e-5 * max(r["plain_abs_max"])
    assert "up to the last bits (chunk 2 samples in batches)" in r["report"]


def test_an_ancestral_sampler_cut_and_resumed_equals_the_plain_run(facts):
    """Its noise source continues across the cut: the kept seed's plain KSampler run, bit for bit."""
    r = fact(facts, "noise_cut_euler_ancestral")
    assert r["equal_to_plain"] == [True], r["max_abs_diff_to_plain"]
    assert "regenerates it bit for bit" in r["report"]


def test_a_masked_latent_with_differential_diffusion_cut_equals_a_plain_run(facts):
    r = fact(facts, "masked_dd")
    assert r["equal_to_plain"] == [True], r["max_abs_diff_to_plain"]
    assert "cost with pruning: 3 candidate-steps (2x1 + 1x1)" in r["report"]


def test_funnel_keeps_the_best_by_early_score_and_counts_equal_the_plan(facts):
    """3 candidates, 3 steps, prune_at 0.3, 0.6 (cuts at steps 1 and 2), survivors 2, 1."""
    r = fact(facts, "funnel")
    first, second = r["stage"]
    assert first == pytest.approx(facts["funnel_first_cut_plain"], abs=1e-6)  # scores of plain runs cut there
    ranked = sorted(range(3), key=lambda i: -first[i])
    assert r["alive"][0] == ranked[:2]
    assert r["alive"][1] == sorted(r["alive"][0], key=lambda i: -second[i])[:1]
    assert all(second[i] is None for i in range(3) if i not in r["alive"][0])
    planned = 3 * 1 + 2 * 1 + 1 * 1
    assert r["candidate_evals"] == planned and f"sampled {planned} candidate-steps" in r["report"]
    assert r["seeds"] == [SEED + r["alive"][1][0]]
    assert "funnel: prune_at 0.3, 0.6, survivors 2, 1 (2 cuts)" in r["report"]
    assert "cost with pruning: 6 candidate-steps (3x1 + 2x1 + 1x1)" in r["report"]


# ------------------------------------------------------------------------------------- through /prompt
def best_of_8_api(n: int = 8, steps: int = 20, size: int = 512, ckpt: str = "sd15.safetensors") -> dict:
    """API format of example_workflows/best_of_8_pruned.json (same node ids and links)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "ICTModelLoader", "inputs": {"ict_model": "8y/ICT (download)", "hp_model": "none",
                                                         "precision": "auto", "device": "auto"}},
        "6": {"class_type": "ICTBestOfNSampler", "inputs": {
            "model": ["1", 0], "seed": 100, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0, "vae": ["1", 2], "ict_model": ["5", 0], "prompt": PROMPT, "n": n, "k": 1,
            "score_by": "ict", "prune_at": 0.3, "survivors": 2, "chunk": 1, "audit": False}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "ict_best_of_8"}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["6", 4]}},
    }


def test_api_workflow_matches_the_ui_example():
    ui = json.loads((ROOT / "example_workflows" / "best_of_8_pruned.json").read_text())
    api = best_of_8_api()
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {(str(a), ao, str(b)) for _, a, ao, b, _, _ in ui["links"]}
    api_links = {(v[0], v[1], k) for k, n in api.items() for v in n["inputs"].values() if isinstance(v, list)}
    assert links == api_links
    bon = next(n for n in ui["nodes"] if n["type"] == "ICTBestOfNSampler")
    assert bon["widgets_values"][:2] == [100, "fixed"] and 8 in bon["widgets_values"]
    loader = next(n for n in ui["nodes"] if n["type"] == "ICTModelLoader")
    assert loader["widgets_values"][:2] == [api["5"]["inputs"]["ict_model"], api["5"]["inputs"]["hp_model"]]
    assert (ROOT / "example_workflows" / "best_of_8_pruned.jpg").is_file()


@pytest.fixture(scope="module")
def bon_server(tmp_path_factory, tiny_models):
    _need_comfyui()
    tmp = tmp_path_factory.mktemp("bon_server")
    base = tmp / "base"
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    ict = _ict_dir(tmp, tiny_models)
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"ict_reward_test:\n    base_path: {tmp}\n    ict: {ict.name}\n"
                    f"    checkpoints: {Path(CHECKPOINT).parent}\n")
    with serve(base, yaml, tmp / "comfyui.log", "--preview-method", "latent2rgb",
               env={"ICT_CACHE_DIR": str(tmp / "cache")}) as srv:
        yield srv


def test_example_workflow_runs_through_the_api(bon_server):
    info = bon_server.get("/object_info")["ICTBestOfNSampler"]
    assert info["display_name"] == "ICT Best-of-N Sampler"
    assert info["output_name"] == ["latent", "images", "seeds", "scores", "report"]
    assert "best_of_8_pruned" in bon_server.get("/workflow_templates")[PACK]
    api = best_of_8_api(n=3, steps=2, size=64, ckpt=Path(CHECKPOINT).name)  # prune_at 0.3 and 2 survivors: step 1
    h = bon_server.wait(bon_server.post_prompt(api), timeout=1200)
    assert h["status"]["status_str"] == "success", h["status"]
    report = h["outputs"]["6"]["text"][0]
    assert report == h["outputs"]["8"]["text"][0]
    assert "cost with pruning: 5 candidate-steps (3x1 + 2x1)" in report and "instead of 6" in report
    assert len(h["outputs"]["7"]["images"]) == 1


# ------------------------------------------------------------------------------------- in the page
def test_funnel_report_is_shown_on_the_node_after_a_run(page_server, shots):  # noqa: F811
    """The best-of-8 template with a two-cut funnel and an audit (3 candidates, 3 steps, cfg 1, 64 px), run in
    the page (tests/test_browser.py's harness, classic canvas); the node's screenshot is docs/img's
    comfyui_best_of_n.png when ICT_BROWSER_SHOTS is set."""
    import test_browser as tb

    tb._need_browser()
    wf = tb.small("best_of_8_pruned")
    node = next(n for n in wf["nodes"] if n["type"] == "ICTBestOfNSampler")
    w = node["widgets_values"]  # seed, control, steps, cfg, sampler, scheduler, denoise, prompt, n, k, score_by,
    w[2], w[3], w[8], w[9] = 3, 1.0, 3, 1  # prune_at, survivors, chunk, audit
    w[11], w[12], w[14] = "0.3, 0.6", "2, 1", True
    seen = tb._run_in_page(page_server, wf, "classic", shots, "best_of_n_funnel")
    text = seen["boxes"][str(node["id"])]["text"]
    assert "funnel: prune_at 0.3, 0.6, survivors 2, 1 (2 cuts)" in text
    assert "audit: cut 2 at step 2:" in text
    assert not seen["errors"], "\n\n".join(seen["errors"])
