"""The ComfyUI nodes, run without ComfyUI on the tiny models; a fake comfy.* checks the host glue.

The V3 nodes are run as ComfyUI runs them (tests/v3_standin.run: execute on a class copy carrying the hidden
values); without ComfyUI, tests/comfy_api_standin stands in for comfy_api."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import v3_standin
from ict_core.errors import ICTError, InputError, ModelFileError

v3_standin.install()

import nodes  # noqa: E402  (after the comfy_api stand-in)
from nodes import adapters, comfy_host, loader, records  # noqa: E402
from nodes.scoring import ICTRerank, ICTScore, ICTSelectBest  # noqa: E402
from nodes.v3 import io  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red cube on a table"


# ------------------------------------------------------------------------------ the nodes, as ComfyUI runs them
def clear_loader_cache() -> None:
    """Forget the models the loader shares between loaders (they live as long as a test holds them)."""
    with loader._lock:
        loader._live.clear()


def load(ict, hp, precision, device):
    return loader.ICTModelLoader.execute(ict, hp, precision, device)


def _ran(node, hidden_pnginfo, **inputs) -> dict:
    pnginfo = adapters.one(hidden_pnginfo)
    out = v3_standin.run(node, hidden={"extra_pnginfo": pnginfo}, **inputs)
    return {"result": out.args, "ui": out.ui}


def score(model, images, prompt, extra_pnginfo=None) -> dict:
    return _ran(ICTScore, extra_pnginfo, model=model, images=images, prompt=prompt)


def select(model, images, prompt, k, score_by, min_score, latent=None, mask=None, extra_pnginfo=None) -> dict:
    return _ran(ICTSelectBest, extra_pnginfo, model=model, images=images, prompt=prompt, k=k, score_by=score_by,
                min_score=min_score, latent=latent, mask=mask)


def rerank(model, images, prompt, score_by, latent=None, mask=None, extra_pnginfo=None) -> dict:
    return _ran(ICTRerank, extra_pnginfo, model=model, images=images, prompt=prompt, score_by=score_by,
                latent=latent, mask=mask)


def options(node, name: str) -> list:
    """A combo input's choices, as the page is sent them."""
    return next(i for i in node.define_schema().inputs if i.id == name).options


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture()
def models_dir(tiny_models, tmp_path, monkeypatch):
    """ict_core's default models folder holding the tiny ICT and HP files."""
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_models.ict, d / "ict.safetensors")
    shutil.copy(tiny_models.hp, d / "hp.safetensors")
    monkeypatch.setenv("ICT_MODELS_DIR", str(d))
    clear_loader_cache()
    yield d
    clear_loader_cache()


@pytest.fixture()
def model(models_dir):
    return load("ict.safetensors", "hp.safetensors", "fp32", "cpu")[0]


@pytest.fixture()
def model_ict_only(models_dir):
    return load("ict.safetensors", "none", "auto", "cpu")[0]


def batch(n=4, h=64, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def latent(n=4):
    return {"samples": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 8, 6).clone(),
            "batch_index": list(range(10, 10 + n)),
            "noise_mask": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 6).clone()}


# ------------------------------------------------------------------------------------------- public contract
def _io(node):
    """(inputs as {id: (type, optional, options)}, outputs as [(type, name, is_list)]) of a V3 node's schema."""
    s = node.GET_SCHEMA()
    ins = {i.id: (i.io_type, bool(i.optional), getattr(i, "options", None)) for i in s.inputs}
    outs = [(o.io_type, o.display_name, bool(o.is_output_list)) for o in s.outputs]
    return s, ins, outs


def test_node_ids_inputs_and_outputs_are_the_public_contract():
    """Saved workflows and the templates link inputs by name and outputs by position, and fill widgets in input
    order: the node ids, input names and order, and outputs stay what they were as classic nodes."""
    m = nodes.NODE_CLASS_MAPPINGS
    assert set(m) == {"ICTModelLoader", "ICTScore", "ICTSelectBest", "ICTRerank", "ICTBestOfNSampler"}
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(m)
    s, ld, out = _io(m["ICTModelLoader"])
    assert s.node_id == "ICTModelLoader" and list(ld) == ["ict_model", "hp_model", "precision", "device"]
    assert ld["precision"][2] == ["auto", "fp16", "bf16", "fp32"] and ld["device"][2] == ["auto", "cpu"]
    assert ld["hp_model"][2][0] == "none"
    assert out == [("ICT_MODEL", "model", False)]

    s, sc, out = _io(m["ICTScore"])
    assert list(sc) == ["model", "images", "prompt"] and sc["model"][0] == "ICT_MODEL" and sc["images"][0] == "IMAGE"
    assert next(i for i in s.inputs if i.id == "prompt").multiline is True
    assert out == [("FLOAT", "scores", True), ("STRING", "report", False)]

    s, sb, out = _io(m["ICTSelectBest"])
    assert list(sb) == ["model", "images", "prompt", "k", "score_by", "min_score", "latent", "mask"]
    assert [k for k, v in sb.items() if v[1]] == ["latent", "mask"]
    assert next(i for i in s.inputs if i.id == "k").min == 1
    assert sb["score_by"][2] == ["ict", "hp", "ict*hp", "group"]
    assert [(t, n) for t, n, _ in out] == [("IMAGE", "images"), ("LATENT", "latent"), ("MASK", "mask"),
                                         ("STRING", "indices"), ("FLOAT", "scores"), ("STRING", "report")]

    s, rr, out = _io(m["ICTRerank"])
    assert list(rr) == ["model", "images", "prompt", "score_by", "latent", "mask"]
    assert [n for _, n, _ in out] == ["images", "latent", "mask", "order", "scores", "report"]
    for name in ("ICTScore", "ICTSelectBest", "ICTRerank"):
        s = m[name].GET_SCHEMA()
        assert s.is_output_node is True and s.is_input_list is True  # ComfyUI sends their table again from cache
        assert set(s.hidden) >= {io.Hidden.extra_pnginfo, io.Hidden.prompt, io.Hidden.unique_id}  # records
        assert s.search_aliases and all(i.tooltip for i in s.inputs), name
        assert all(o.id is None for o in s.outputs)  # ComfyUI numbers them; an input's name may not repeat


def test_select_best_default_min_score_keeps_every_image(model):
    """min_score's default is its minimum, -1, and filters nothing (a cosine is never below it), so k images
    come out; 0.0 was an active filter on a -1..1 cosine."""
    s = ICTSelectBest.GET_SCHEMA()
    ms = next(i for i in s.inputs if i.id == "min_score")
    assert ms.default == ms.min == -1.0
    imgs = batch(4)
    out = select([model], [imgs], ["three green leaves"], [4], ["ict"], [ms.default])
    assert len(out["result"][0]) == 4 and out["ui"]["ict_table"][0]["notes"] == []


def test_pack_root_imports_like_comfyui_loads_it():
    """ComfyUI imports the folder as a package from its __init__.py; nothing heavy may happen then.  It reads
    `comfy_entrypoint` only where the package exports no NODE_CLASS_MAPPINGS."""
    import asyncio

    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("ict_reward_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ict_reward_pack"] = mod
    try:
        spec.loader.exec_module(mod)
        ext = mod.comfy_entrypoint()
        listed = asyncio.run(ext.get_node_list())
        assert [c.__name__ for c in listed] == [c.__name__ for c in nodes.NODES]
        assert not hasattr(mod, "NODE_CLASS_MAPPINGS")  # else ComfyUI would not read the entry point
        assert mod.WEB_DIRECTORY == "./web" and (ROOT / "web" / "ict_scores.js").is_file()
        assert not {"transformers", "open_clip"} & (set(sys.modules) - before)
    finally:
        for name in [n for n in sys.modules if n == "ict_reward_pack" or n.startswith("ict_reward_pack.")]:
            del sys.modules[name]


def test_example_workflows_use_only_known_nodes_and_inputs():
    import json

    files = sorted((ROOT / "example_workflows").glob("*.json"))
    assert len(files) >= 2
    for f in files:
        wf = json.loads(f.read_text())
        assert "nodes" in wf and "links" in wf, f"{f.name} is not a UI-format workflow"
        for n in wf["nodes"]:
            if n["type"].startswith("ICT"):
                assert n["type"] in nodes.NODE_CLASS_MAPPINGS


def test_example_templates_have_thumbnails():
    """ComfyUI's template browser shows example_workflows/<name>.jpg for a custom node's template."""
    from PIL import Image

    for name in ("ict_rerank_images", "ict_best_of_4_second_pass"):
        thumb = ROOT / "example_workflows" / f"{name}.jpg"
        assert (ROOT / "example_workflows" / f"{name}.json").is_file() and thumb.is_file(), thumb
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.width >= 320 and im.height >= 200


# ------------------------------------------------------------------------------------------------ loader
def test_loader_lists_files_and_reuses_the_loaded_model(models_dir):
    files = options(loader.ICTModelLoader, "ict_model")
    assert files == ["8y/ICT (download)", "hp.safetensors", "ict.safetensors"]
    assert options(loader.ICTModelLoader, "hp_model") == ["none", "8y/HP (download)", "hp.safetensors",
                                                          "ict.safetensors"]
    a = load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0]
    b = load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0]
    assert a is b and a.scorer.has_hp and a.patcher is None
    changed = loader.ICTModelLoader.fingerprint_inputs("ict.safetensors", "hp.safetensors", "auto", "cpu")
    os.utime(models_dir / "ict.safetensors", ns=(1, 1))
    assert loader.ICTModelLoader.fingerprint_inputs("ict.safetensors", "hp.safetensors", "auto", "cpu") != changed
    c = load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0]
    assert c is not a  # the file changed on disk: loaded again


def test_the_official_choices_use_the_files_already_there_without_the_network(models_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    assert loader.ICTModelLoader.validate_inputs("8y/ICT (download)", "8y/HP (download)", "auto", "cpu") is True
    m = load("8y/ICT (download)", "8y/HP (download)", "auto", "cpu")[0]
    assert m.scorer.has_hp and m.describe().startswith("ICT ict.safetensors + HP hp.safetensors")  # the files


def test_the_loader_downloads_an_official_model_on_its_first_run(tiny_models, tmp_path, monkeypatch):
    """A fresh models folder: queueing passes, the run downloads and converts, the next run only loads."""
    import json

    import ict_core.config as arch_config
    from fake_hub import FakeHub

    monkeypatch.setenv("ICT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(arch_config, "VIT_H_14", json.loads(tiny_models.config.read_text()))
    clear_loader_cache()
    with FakeHub({"8y/ICT": tiny_models.ict_src}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert loader.ICTModelLoader.validate_inputs("8y/ICT (download)", "none", "auto", "cpu") is True
        assert hub.requests == []  # queueing never downloads
        m = load("8y/ICT (download)", "none", "auto", "cpu")[0]
        assert (tmp_path / "models" / "ict.safetensors").is_file() and not m.scorer.has_hp
        asked = len(hub.requests)
        del m
        clear_loader_cache()
        load("8y/ICT (download)", "none", "auto", "cpu")
        assert len(hub.requests) == asked
    clear_loader_cache()


def test_the_pack_keeps_no_copy_of_a_model_nobody_holds(models_dir):
    """ComfyUI's node cache owns the loaded model: once it lets go (/free, "Unload models"), nothing of the
    pack keeps the weights alive, and the next run loads again."""
    import gc
    import weakref

    m = load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0]
    modules = weakref.ref(m.scorer.modules)
    del m
    gc.collect()
    assert modules() is None
    again = load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0]
    assert again.scorer.has_hp


def test_a_wrong_file_is_refused_at_queue_time_and_the_loaded_model_stays(models_dir):
    """VALIDATE_INPUTS checks the files' headers when the workflow is queued, before ComfyUI drops the
    cached output of the previous choice; a failed load leaves the loaded model in use too."""
    good = load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0]
    v = loader.ICTModelLoader.validate_inputs
    assert v("ict.safetensors", "hp.safetensors", "auto", "cpu") is True
    assert "HP model but was given as the ICT model" in v("hp.safetensors", "none", "auto", "cpu")
    assert "not found" in v("nope.safetensors", "none", "auto", "cpu")
    assert "precision" in v("ict.safetensors", "none", "fp8", "cpu")
    (models_dir / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    assert "\n" not in v("broken.safetensors", "none", "auto", "cpu")
    with pytest.raises(ModelFileError):
        load("hp.safetensors", "none", "auto", "cpu")
    assert load("ict.safetensors", "hp.safetensors", "auto", "cpu")[0] is good


def test_loader_wrong_kind_and_missing_file_say_so(models_dir):
    with pytest.raises(ModelFileError, match="HP model but was given as the ICT model"):
        load("hp.safetensors", "none", "auto", "cpu")
    with pytest.raises(ModelFileError, match="not found"):
        load("nope.safetensors", "none", "auto", "cpu")
    with pytest.raises(InputError, match="precision"):
        load("ict.safetensors", "none", "fp8", "cpu")


# ------------------------------------------------------------------------------------------------- scoring
def test_score_gives_one_float_per_image_and_a_table(model):
    imgs = batch()
    out = score([model], [imgs], [PROMPT])
    scores, report = out["result"]
    direct = model.scorer.score([t.permute(2, 0, 1) for t in imgs], PROMPT)
    assert scores == pytest.approx([r.score for r in direct], abs=1e-6)
    assert len(scores) == 4 and isinstance(report, str) and "ict*hp" in report
    tab = out["ui"]["ict_table"][0]
    assert [row["index"] for row in tab["rows"]] == [0, 1, 2, 3] and tab["has_hp"]
    assert out["ui"]["text"] == [report]


def test_select_best_picks_images_latent_and_mask_alike(model):
    imgs, lat, mask = batch(), latent(), torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, 64, 48)
    out = select([model], [imgs], [PROMPT], [2], ["ict*hp"], [-1.0], latent=[lat], mask=[mask])
    images, lat_out, mask_out, indices, scores, report = out["result"]
    idx = [int(i) for i in indices.split(",")]
    assert len(idx) == 2 and scores[0] >= scores[1]
    ranked = model.scorer.score([t.permute(2, 0, 1) for t in imgs], PROMPT)
    best = sorted(range(4), key=lambda i: -ranked[i].score)[:2]
    assert idx == best
    assert torch.equal(images, imgs[idx])
    assert lat_out["samples"][:, 0, 0, 0].tolist() == idx
    assert lat_out["batch_index"] == [10 + i for i in idx]
    assert lat_out["noise_mask"][:, 0, 0, 0].tolist() == idx
    assert mask_out[:, 0, 0].tolist() == idx
    assert lat["samples"].shape[0] == 4  # input untouched


def test_select_best_clamps_k_and_keeps_the_best_below_min_score(model):
    imgs = batch()
    out = select([model], [imgs], [PROMPT], [9], ["ict"], [-1.0])
    assert len(out["result"][3].split(",")) == 4 and "k=9" in out["result"][5]
    out = select([model], [imgs], [PROMPT], [3], ["ict"], [0.99])
    images, _, _, indices, scores, report = out["result"]
    assert images.shape[0] == 1 and "min_score" in report and "single best" in report
    assert out["ui"]["ict_table"][0]["notes"]


def test_outputs_without_latent_or_mask_inputs_are_blocked_not_broken(model):
    _, lat_out, mask_out, *_ = select(model, batch(2), PROMPT, 1, "ict", 0.0)["result"]
    assert lat_out is None and mask_out is None  # ComfyUI gets an ExecutionBlocker with a message instead


def test_rerank_orders_everything_best_first(model):
    imgs, lat = batch(5), latent(5)
    out = rerank([model], [imgs], [PROMPT], ["group"], latent=[lat], mask=[torch.ones(64, 48)])
    images, lat_out, mask_out, order, scores, report = out["result"]
    idx = [int(i) for i in order.split(",")]
    assert sorted(idx) == list(range(5)) and scores == sorted(scores, reverse=True)
    assert torch.equal(images, imgs[idx]) and lat_out["samples"][:, 0, 0, 0].tolist() == idx
    assert mask_out.shape == (1, 64, 48)  # a single mask applies to every image: passed through


def test_bad_inputs_give_one_clear_message(model, model_ict_only):
    imgs = batch()
    with pytest.raises(InputError, match="prompt is empty"):
        score([model_ict_only], [imgs], ["  \n"])
    with pytest.raises(InputError, match="prompt is empty.*score_by hp"):
        select([model], [imgs], [""], [1], ["ict*hp"], [0.0])
    with pytest.raises(InputError, match="latent holds 3 samples but 4 images"):
        select([model], [imgs], [PROMPT], [1], ["ict"], [0.0], latent=[latent(3)])
    with pytest.raises(InputError, match="mask holds 3 masks but 4 images"):
        rerank([model], [imgs], [PROMPT], ["ict"], mask=[torch.zeros(3, 64, 48)])
    with pytest.raises(InputError, match="needs an HP model"):
        select([model_ict_only], [imgs], [PROMPT], [1], ["ict*hp"], [0.0])
    with pytest.raises(InputError, match="connect an ICT Model Loader"):
        score([None], [imgs], [PROMPT])
    with pytest.raises(InputError, match="3 prompts"):
        score([model], [imgs], ["a\n---\nb\n---\nc"])


def test_empty_prompt_scores_by_hp_alone(model, monkeypatch):
    """HP needs no prompt: with score_by hp (or ICT Score and an HP model) an empty prompt is fine, and the
    ICT image tower is not run."""
    imgs = batch(5)
    with_prompt = [r.hp for r in model.scorer.score(list(imgs.permute(0, 3, 1, 2)), PROMPT)]
    calls = []
    vision = model.scorer.modules.ict.vision_model
    monkeypatch.setattr(vision, "forward", lambda *a, **k: calls.append(1))
    images, _lat, _mask, order, scores, report = select([model], [imgs], [""], [2], ["hp"],
                                                                        [0.0])["result"]
    idx = [int(i) for i in order.split(",")]
    assert idx == sorted(range(5), key=lambda i: -with_prompt[i])[:2]
    assert scores == pytest.approx([with_prompt[i] for i in idx], abs=1e-5) and torch.equal(images, imgs[idx])
    scores, report = score([model], [imgs], [""])["result"]
    assert scores == pytest.approx(with_prompt, abs=1e-5) and calls == []


def test_images_of_different_sizes_in_a_list(model):
    a, b = batch(2, 64, 48), batch(1, 40, 72, seed=1)
    scores, _ = score([model], [a, b], [PROMPT])["result"]
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    best, *_ = select([model], [a, b], [PROMPT], [1], ["ict"], [0.0])["result"]
    assert best.shape[0] == 1
    with pytest.raises(InputError, match="different sizes"):
        rerank([model], [a, b], [PROMPT], ["ict"])


def test_one_prompt_per_image_or_per_group(model):
    imgs = batch(4)
    out = score([model], [imgs], ["a red cube\n---\na blue ball"])
    rows = out["ui"]["ict_table"][0]["rows"]
    assert [r["prompt"] for r in rows] == ["a red cube", "a red cube", "a blue ball", "a blue ball"]
    assert adapters.split_prompts(["x", "y", "z", "w"], 4, "n") == ["x", "y", "z", "w"]
    direct = model.scorer.score([t.permute(2, 0, 1) for t in imgs], ["a red cube"] * 2 + ["a blue ball"] * 2)
    assert out["result"][0] == pytest.approx([r.score for r in direct], abs=1e-6)


def test_rgba_and_grayscale_images_are_scored(model):
    rgba = torch.rand(2, 32, 32, 4)
    scores, _ = score(model, rgba, PROMPT)["result"]
    rgb, _ = score(model, rgba[..., :3].contiguous(), PROMPT)["result"]
    assert scores == pytest.approx(rgb)


def test_noise_mask_of_another_batch_size_is_repeated_like_latent_from_batch():
    """A noise_mask batch that is neither 1 nor B is repeated to B before picking (LatentFromBatch's rule):
    the picked latent carries the picked sample's mask, not the one at the same position of a shorter batch."""
    lat = latent(4)
    lat["noise_mask"] = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 6).clone()  # 2 masks, B=4
    out = adapters.take_latent(lat, [3, 0])
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 0.0]  # sample 3 has mask 3 % 2 = 1
    three = dict(lat, noise_mask=torch.tensor([5.0, 6.0, 7.0]).view(3, 1, 1))  # [B,H,W] masks, 3 for B=4
    assert adapters.take_latent(three, [3, 2])["noise_mask"][:, 0, 0].tolist() == [5.0, 7.0]
    single = dict(lat, noise_mask=torch.ones(1, 1, 8, 6))
    assert adapters.take_latent(single, [2])["noise_mask"].shape[0] == 1  # one mask for all: kept


def test_batch_index_is_defaulted_and_follows_the_picks():
    lat = {"samples": torch.zeros(4, 4, 8, 6)}
    assert adapters.take_latent(lat, [2, 0])["batch_index"] == [2, 0]
    assert adapters.take_latent(latent(4), [3, 1])["batch_index"] == [13, 11]
    first = {k: v for k, v in latent(2).items() if k != "noise_mask"}
    both = adapters.gather_latent([first, {"samples": torch.zeros(2, 4, 8, 6)}], 4, "n")
    assert both["batch_index"] == [10, 11, 0, 1]  # as LatentBatch joins them
    masks = adapters.gather_latent([latent(2), dict(latent(3), noise_mask=torch.zeros(2, 1, 8, 6))], 5, "n")
    assert masks["noise_mask"].shape[0] == 5


def test_an_empty_prompt_block_is_an_error_not_a_redivision(model):
    """'embedding:x' alone is empty once prompt syntax is removed: the batch is not re-divided among the
    other blocks (which would score images against another batch's prompt)."""
    with pytest.raises(InputError, match=r"prompt block 2 of 3 .*is empty.*embedding:EasyNegative"):
        adapters.split_prompts("a fox\n---\nembedding:EasyNegative\n---\na cat", 6, "ICTScore")
    with pytest.raises(InputError, match="block 3 of 3"):
        adapters.split_prompts("a fox\n---\na cat\n---\n", 4, "ICTScore")
    with pytest.raises(InputError, match="block 2 of 2"):
        score([model], [batch(4)], ["a fox", "(:1.2)"])
    assert adapters.split_prompts("a fox\n---\na cat", 4, "n") == ["a fox"] * 2 + ["a cat"] * 2
    assert adapters.split_prompts("embedding:x\n---\n ", 2, "n", optional=True) is None


def _save_like_comfyui(images, extra_pnginfo, folder):
    """What nodes.SaveImage does with each image of its batch (ComfyUI 0.3.64), without ComfyUI."""
    import json

    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    paths = []
    for n, image in enumerate(images):
        img = Image.fromarray(np.clip(255. * image.cpu().numpy(), 0, 255).astype(np.uint8))
        meta = PngInfo()
        for x in extra_pnginfo:
            meta.add_text(x, json.dumps(extra_pnginfo[x]))
        paths.append(folder / f"ComfyUI_{n:05}_.png")
        img.save(paths[-1], pnginfo=meta, compress_level=4)
    return paths


def test_each_saved_png_carries_its_own_scores(model, tmp_path):
    """The ICT nodes write their records into extra_pnginfo; Save Image after them writes it into every
    file, and each file finds its own record (ict, hp, score, rule, model) by its pixels."""
    from ict_core import metadata

    imgs = batch(4)
    pnginfo = {"workflow": {"nodes": []}}
    out = rerank([model], [imgs], [PROMPT], ["ict*hp"], extra_pnginfo=[pnginfo])
    images, _lat, _mask, order, scores, _report = out["result"]
    best = select([model], [imgs], [PROMPT], [1], ["hp"], [0.0], extra_pnginfo=[pnginfo])["result"]
    assert len(pnginfo[metadata.KEY]["images"]) == 4  # the same pixels again: the later record replaces
    ranked = model.scorer.score([t.permute(2, 0, 1) for t in imgs], PROMPT)
    for pos, path in enumerate(_save_like_comfyui(images, pnginfo, tmp_path)):
        i = int(order.split(",")[pos])
        own = metadata.own_scores(path)
        if torch.equal(images[pos], best[0][0]):
            assert own["by"] == "hp" and own["rank"] == 1 and own["value"] == pytest.approx(ranked[i].hp)
        else:
            assert own["by"] == "ict*hp" and own["rank"] == pos + 1 and own["value"] == pytest.approx(scores[pos])
        assert own["index"] == i and own["ict"] == pytest.approx(ranked[i].ict)
        assert own["hp"] == pytest.approx(ranked[i].hp) and own["score"] == pytest.approx(ranked[i].score)
        assert own["model"] == "ict.safetensors" and own["hp_model"] == "hp.safetensors" and own["prompt"] == PROMPT
    (tmp_path / "flipped").mkdir()
    other = _save_like_comfyui(imgs.flip(1), pnginfo, tmp_path / "flipped")
    assert metadata.own_scores(other[0]) is None  # an image changed after scoring has no record of its own
    score([model], [imgs], [PROMPT], extra_pnginfo=[None])  # API client without extra_pnginfo: fine


def _api_prompt(prompt_text: str = PROMPT, prefix: str = "ICT_best") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "6": {"class_type": "ICTModelLoader", "inputs": {"ict_model": "ict.safetensors", "hp_model": "hp.safetensors",
                                                         "precision": "auto", "device": "cpu"}},
        "7": {"class_type": "ICTSelectBest", "inputs": {"model": ["6", 0], "images": ["1", 0], "prompt": prompt_text,
                                                        "k": 2, "score_by": "ict*hp", "min_score": -1.0},
              "_meta": {"title": "ICT Select Best"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def test_a_cached_nodes_records_reach_the_next_runs_saved_images(model, tmp_path):
    """ComfyUI takes an ICT node whose inputs did not change from its cache and does not run it: the /prompt
    hook puts the records it wrote last time into the new run's extra_pnginfo (created when the client sends
    none), so Save Image after it (a new filename_prefix, a second Save Image) still writes each image's own."""
    from ict_core import metadata

    records.forget()
    imgs = batch(4)
    first = {"workflow": {"nodes": []}}
    out = v3_standin.run(ICTSelectBest, hidden={"extra_pnginfo": first, "prompt": _api_prompt(), "unique_id": "7"},
                         model=[model], images=[imgs], prompt=[PROMPT], k=[2], score_by=["ict*hp"], min_score=[-1.0])
    picked = out.args[0]
    assert len(first[metadata.KEY]["images"]) == 2

    again = {"prompt": _api_prompt(prefix="another_prefix"), "extra_data": {"extra_pnginfo": {"workflow": {}}}}
    assert records.on_prompt(again) is again
    carried = again["extra_data"]["extra_pnginfo"]
    assert carried[metadata.KEY] == first[metadata.KEY] and carried["workflow"] == {}
    for pos, path in enumerate(_save_like_comfyui(picked, carried, tmp_path)):
        own = metadata.own_scores(path)
        assert own is not None and own["rank"] == pos + 1 and own["by"] == "ict*hp"

    api_client = {"prompt": _api_prompt()}                     # sends no extra_data at all
    records.on_prompt(api_client)
    assert api_client["extra_data"]["extra_pnginfo"][metadata.KEY] == first[metadata.KEY]
    changed = {"prompt": _api_prompt(prompt_text="another prompt"), "extra_data": {}}  # the node runs again
    records.on_prompt(changed)
    assert metadata.KEY not in changed["extra_data"]["extra_pnginfo"]
    upstream = _api_prompt()
    upstream["1"]["inputs"]["image"] = "b.png"                 # an upstream change reaches the node too
    assert records.signature(upstream, "7") != records.signature(_api_prompt(), "7")
    records.forget()


def test_the_prompt_hook_is_bounded_and_never_raises():
    """It runs on every /prompt before ComfyUI validates it: odd requests pass through untouched, and the
    records it keeps stay within MAX_SIGNATURES sets and MAX_RECORDS records."""
    records.forget()
    loop = {"1": {"class_type": "ICTScore", "inputs": {"images": ["1", 0]}}}
    for bad in (None, [], {"prompt": "x"}, {"prompt": loop}, {"prompt": {"1": {"class_type": "ICTScore"}}},
                {"prompt": {"1": 5}}, {"prompt": _api_prompt(), "extra_data": []}):
        assert records.on_prompt(bad) is bad
    assert records.signature(loop, "1") is None  # a cycle
    for i in range(records.MAX_SIGNATURES + 5):
        records._keep(f"sig{i}", [{"pixels": f"p{i}"}] * 300)
    with records._lock:
        assert len(records._kept) <= records.MAX_SIGNATURES
        assert sum(len(v) for v in records._kept.values()) <= records.MAX_RECORDS
    records._keep("huge", [{}] * (records.MAX_RECORDS + 1))
    with records._lock:
        assert sum(len(v) for v in records._kept.values()) <= records.MAX_RECORDS
    records.forget()


def test_tables_give_the_rank_and_hp_once():
    """ICT Score keeps input order but its table's rank is the rank by score; by hp the report has one hp column."""
    from ict_core import ranking
    from ict_core.scorer import ScoreResult
    from nodes.scoring import table

    res = [ScoreResult(i, None, "p", ict=v, hp=0.5, hp_raw=0.0, score=v * 0.5) for i, v in enumerate([0.1, 0.3, 0.2])]
    rows = table(res, "ict", [0, 1, 2], [r.ict for r in res])["rows"]
    assert [r["rank"] for r in rows] == [3, 1, 2] and [r["index"] for r in rows] == [0, 1, 2]
    head = ranking.report(res, "hp").splitlines()[0].split()
    assert head.count("hp") == 1


# --------------------------------------------------------------------------------- host glue (fake ComfyUI)
class _Interrupted(Exception):
    pass


class CastOps:
    """Cast-at-use layers as comfy.ops.manual_cast behaves: weights cast to the input's dtype and device."""

    class Linear(torch.nn.Linear):
        comfy_cast_weights = True

        def forward(self, x):
            b = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return torch.nn.functional.linear(x, self.weight.to(x.device, x.dtype), b)

    class Conv2d(torch.nn.Conv2d):
        comfy_cast_weights = True

        def forward(self, x):
            b = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return self._conv_forward(x, self.weight.to(x.device, x.dtype), b)

    class LayerNorm(torch.nn.LayerNorm):
        comfy_cast_weights = True

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight.to(x.device, x.dtype),
                                                  self.bias.to(x.device, x.dtype), self.eps)

    class Embedding(torch.nn.Embedding):
        comfy_cast_weights = True

        def forward(self, ids):
            assert self.bias is None  # comfy.ops reads it for every layer
            return torch.nn.functional.embedding(ids, self.weight.to(ids.device), self.padding_idx)


@pytest.fixture()
def fake_comfy(monkeypatch, tmp_path):
    """Just enough of folder_paths and comfy.* for the host glue; records what the nodes ask of them."""
    calls = {"load": [], "bars": [], "interrupt": False}
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    extra = tmp_path / "extra_ict"
    extra.mkdir()
    fp.folder_names_and_paths = {"ict": ([str(extra)], set())}  # as an extra_model_paths.yaml `ict:` entry leaves it

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = []
        for p in paths:
            if os.path.isdir(p):
                out += [f for f in os.listdir(p) if not exts or os.path.splitext(f)[1] in exts]
        return sorted(out)

    def get_full_path(name, filename):
        for p in fp.folder_names_and_paths[name][0]:
            if os.path.isfile(os.path.join(p, filename)):
                return os.path.join(p, filename)
        return None

    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])

    mm = types.ModuleType("comfy.model_management")

    class VRAMState:
        DISABLED, NO_VRAM, LOW_VRAM, NORMAL_VRAM, HIGH_VRAM, SHARED = range(6)

    mm.VRAMState, mm.vram_state = VRAMState, VRAMState.DISABLED   # as --cpu sets it
    mm.text_encoder_device = mm.text_encoder_offload_device = lambda: torch.device("cpu")
    mm.text_encoder_dtype = lambda device=None: torch.float16    # ComfyUI's default for auxiliary encoders
    mm.get_free_memory = lambda dev=None, torch_free_too=False: calls["free"]
    calls["free"] = 64 << 30
    mm.load_models_gpu = lambda models, **kw: calls["load"].append((models, kw))

    def throw():
        if calls["interrupt"]:
            raise _Interrupted()

    mm.throw_exception_if_processing_interrupted = throw
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.callbacks = []
            if getattr(model, "device", None) is None:
                model.device = offload_device

        def add_callback(self, kind, fn):
            self.callbacks.append((kind, fn))

    mp.ModelPatcher = ModelPatcher
    ops = types.ModuleType("comfy.ops")
    ops.manual_cast = CastOps
    ut = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.updates = []
            calls["bars"].append(self)

        def update_absolute(self, value, total=None):
            self.updates.append((value, total))

    ut.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher, comfy.utils, comfy.ops = mm, mp, ut, ops
    for name, mod in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm,
                      "comfy.model_patcher": mp, "comfy.utils": ut, "comfy.ops": ops}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    clear_loader_cache()
    yield types.SimpleNamespace(fp=fp, calls=calls, extra=extra)
    clear_loader_cache()


def test_host_glue_registers_folder_patcher_progress_and_cancel(fake_comfy, tiny_models):
    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    (fake_comfy.extra / "notes.txt").write_text("not a model")
    comfy_host.register_model_folder()
    paths, exts = fake_comfy.fp.folder_names_and_paths["ict"]
    assert exts == {".safetensors"} and paths[0] == str(fake_comfy.extra) and paths[1].endswith(os.sep + "ict")
    assert options(loader.ICTModelLoader, "ict_model") == ["8y/ICT (download)", "ict.safetensors"]

    model = load("ict.safetensors", "none", "auto", "auto")[0]
    assert model.patcher is not None and model.patcher.model is model.scorer.modules
    assert model.patcher.load_device.type == "cpu"  # --cpu respected
    assert load("ict.safetensors", "none", "auto", "auto")[0] is model

    from ict_core.modeling import activation_bytes

    per_image = activation_bytes(model.scorer.modules, model.scorer.dtype)
    fake_comfy.calls["free"] = 2 * per_image + 1          # room for two images' activations: chunks of 2
    score(model, batch(5), PROMPT)
    (patchers, kw), = fake_comfy.calls["load"][-1:]
    assert patchers == [model.patcher] and "force_full_load" not in kw  # ComfyUI may load it in part
    assert kw["memory_required"] == 5 * per_image and model.scorer.chunk_size == 2
    bar = fake_comfy.calls["bars"][-1]
    assert bar.updates[-1][0] == 5 and len(bar.updates) >= 4  # per chunk of 2
    fake_comfy.calls["free"] = 0                           # no memory left: one image at a time, never 0
    score(model, batch(2), PROMPT)
    assert model.scorer.chunk_size == 1

    fake_comfy.calls["interrupt"] = True
    with pytest.raises(_Interrupted):
        score(model, batch(5), PROMPT)


def test_the_patcher_is_the_class_comfyuis_clip_vision_uses(fake_comfy, tiny_models):
    """ComfyUI 0.33's CLIP vision takes comfy.model_patcher.CoreModelPatcher, which main.py points at the
    Dynamic VRAM patcher where that is on; the ICT model goes the same way (plain ModelPatcher before 0.33)."""
    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    mp = sys.modules["comfy.model_patcher"]
    plain = load("ict.safetensors", "none", "auto", "auto")[0]
    assert type(plain.patcher) is mp.ModelPatcher
    del plain
    clear_loader_cache()

    class CoreModelPatcher(mp.ModelPatcher):
        pass

    mp.CoreModelPatcher = CoreModelPatcher
    model = load("ict.safetensors", "none", "auto", "auto")[0]
    assert type(model.patcher) is CoreModelPatcher and model.patcher.model is model.scorer.modules


def test_precision_is_resolved_for_the_run_device(fake_comfy, monkeypatch, tiny_models):
    """auto stays fp32 (the official scores); fp16 weights may wait on the CPU to run on the GPU."""
    import ict_core.scorer as scorer_mod

    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    seen = {}
    real = scorer_mod.resolve_dtype
    monkeypatch.setattr(scorer_mod, "resolve_dtype", lambda p, d: seen.setdefault((p, d.type), real(p, d)))
    clear_loader_cache()
    model = load("ict.safetensors", "none", "auto", "auto")[0]
    assert model.scorer.dtype == torch.float32 and ("auto", "cpu") in seen
    mm = sys.modules["comfy.model_management"]
    mm.text_encoder_device = lambda: torch.device("meta")  # ComfyUI's rule decides where it runs
    assert comfy_host.plan_device("auto") == (torch.device("meta"), torch.device("cpu"))
    assert comfy_host.plan_device("cpu") == (torch.device("cpu"), torch.device("cpu"))
    clear_loader_cache()


def test_layers_cast_at_use_keep_the_official_fp32_scores(fake_comfy, tiny_models):
    """Built like ComfyUI's CLIP vision (cast-at-use layers, weights waiting in a narrower dtype), precision
    auto still gives the fp32 model's scores: the weights wait in the file's bf16 (exact in fp32), not in
    ComfyUI's fp16 (which would round them), and are cast to fp32 at use."""
    from ict_core import Scorer

    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    shutil.copy(tiny_models.hp, fake_comfy.extra / "hp.safetensors")
    model = load("ict.safetensors", "hp.safetensors", "auto", "auto")[0]
    mods = model.scorer.modules
    fc1 = mods.ict.vision_model.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, CastOps.Linear) and fc1.weight.dtype == torch.bfloat16   # as released, not fp16
    assert isinstance(mods.hp.head.layers[0], CastOps.Linear) and mods.hp.head.layers[0].weight.dtype == torch.float32
    assert mods.ict.vision_model.embeddings.class_embedding.dtype == torch.float32
    assert mods.ict.text_model.embeddings.token_embedding.weight.dtype == torch.float32
    plain = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu", precision="fp32")
    imgs = [t.permute(2, 0, 1) for t in batch(3)]
    got = model.scorer.score(imgs, PROMPT)
    want = plain.score(imgs, PROMPT)
    assert [v for r in got for v in (r.ict, r.hp)] == pytest.approx([v for r in want for v in (r.ict, r.hp)], abs=1e-6)
    assert fake_comfy.calls and model.patcher.callbacks == []  # fake has no patcher_extension: nothing to add
    mm = sys.modules["comfy.model_management"]
    mm.text_encoder_dtype = lambda device=None: torch.float32  # --fp32-text-enc: weights wait in fp32
    clear_loader_cache()
    fp32 = load("ict.safetensors", "none", "auto", "auto")[0]
    assert fp32.scorer.modules.ict.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32


def test_a_released_model_is_given_back_to_the_os_after_the_collection(fake_comfy, tiny_models, monkeypatch, caplog):
    """glibc keeps freed tensors in its heaps: when ComfyUI lets the model go, the pack trims them, once more
    after the garbage collection that frees the model's reference cycles has finished."""
    import gc
    import logging

    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    trims = []
    monkeypatch.setattr(comfy_host, "_trim", lambda: trims.append(1))
    model = load("ict.safetensors", "none", "auto", "auto")[0]
    with caplog.at_level(logging.INFO, logger="nodes.comfy_host"):
        del model
        gc.collect()
        gc.collect()
    assert "ICT model released" in caplog.text and len(trims) >= 2  # at the release and after the collection


def test_a_partial_load_moves_the_loose_tensors_with_the_model(fake_comfy, tiny_models):
    """ComfyUI's partial load moves layer by layer; the class embedding and position ids, outside any layer,
    follow the model to its device after each load (ON_LOAD callback), the layers stay where ComfyUI put them."""
    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    model = load("ict.safetensors", "none", "auto", "auto")[0]
    comfy_host._move_loose_tensors(model.patcher, torch.device("meta"))
    emb = model.scorer.modules.ict.vision_model.embeddings
    assert emb.class_embedding.device.type == "meta" and emb.position_ids.device.type == "meta"
    assert emb.patch_embedding.weight.device.type == "cpu"  # a layer: ComfyUI's to move (or cast at use)
    clear_loader_cache()


def test_bf16_on_comfyuis_cpu_where_the_cpu_runs_it(fake_comfy, monkeypatch, tiny_models):
    """ComfyUI --cpu with precision bf16: honoured on a CPU with native bf16, and the nodes score."""
    import ict_core.scorer as scorer_mod

    shutil.copy(tiny_models.ict, fake_comfy.extra / "ict.safetensors")
    monkeypatch.setattr(scorer_mod, "cpu_runs_bf16", lambda: True)
    clear_loader_cache()
    model = load("ict.safetensors", "none", "bf16", "auto")[0]
    assert model.scorer.dtype == torch.bfloat16 and model.scorer.device.type == "cpu"
    images, _lat, _mask, order, scores, _report = rerank([model], [batch(3)], [PROMPT], ["ict"])["result"]
    assert images.shape == batch(3).shape and len(scores) == 3 and scores == sorted(scores, reverse=True)
    clear_loader_cache()


def test_errors_are_ict_errors_with_one_line(model):
    with pytest.raises(ICTError) as e:
        select([model], [batch()], [PROMPT], [1], ["best"], [0.0])
    assert "\n" not in str(e.value) and "score_by" in str(e.value)


def test_prompt_weights_and_embeddings_are_not_scored():
    """ComfyUI's (word:1.2) weights and embedding: names are generation syntax, not text the image contains."""
    from nodes.adapters import split_prompts

    assert split_prompts("(red fox:1.2), embedding:EasyNegative, snow", 2, "ICTScore") == ["red fox, snow"] * 2


def test_prompt_is_encoded_once_across_queue_runs(model, monkeypatch):
    """Every queue run scores the same prompt again: after the first, it comes from the embedding cache."""
    assert model.scorer.cache is not None
    text_model = model.scorer.modules.ict.text_model
    calls = []
    original = text_model.forward
    monkeypatch.setattr(text_model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompt = "a prompt only this test uses"
    first = score(model, batch(2), prompt)
    second = score(model, batch(2), prompt)
    assert len(calls) == 1 and first["result"][0] == second["result"][0]
