"""What API clients get from the webui extension (issue 22), against the stand-in webui of test_webui.py: the
messages in the response itself, score lists that follow the images returned by X/Y/Z plot and Prompt matrix
(stand-ins below, cut from A1111 1.10's scripts, which Forge Classic copies), the memory given back after
unloading, and hints that run as printed."""
# ruff: noqa: F811  (the fixtures `host`, `installed`, `reference_scorer` are imported from test_webui.py)
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from copy import copy
from pathlib import Path

import pytest
from PIL import Image

from test_webui import (  # noqa: F401
    PROMPTS,
    H,
    P,
    Runner,
    SelectableScript,
    W,
    create_infotext,
    host,
    image_outputs,
    installed,
    params_line,
    reference_scorer,
    run,
)

ROOT = Path(__file__).resolve().parents[1]
MSG = "ICT reward messages"


def api_info(res) -> dict:
    """The API's `info`, as Forge Classic writes it (json.dumps without a fallback)."""
    return json.loads(res.js())


def scores_of(res, key="ICT score"):
    """Each returned image's own score (from its infotext), after the grid."""
    return [params_line(t).get(key) for t in res.infotexts[res.index_of_first_image:]]


# =============================================================================================== X/Y/Z plot
class XYZ:
    """scripts/xyz_grid.py (A1111 1.10, Forge Classic): run() defines cell(x, y, z, ix, iy, iz), which generates
    on a shallow copy of p; draw_xyz_grid() runs the cells with the costly axis outermost and puts image 0 of each
    at ix + iy*len(xs) + iz*len(xs)*len(ys); the grids' infotexts come from the cell's p after its generation."""
    filename = "scripts/xyz_grid.py"

    def title(self):
        return "X/Y/Z plot"

    def run(self, webui, p, xs, ys, zs, include_lone_images, include_sub_grids, first_axes_processed="z"):
        grid_infotext = [None] * (1 + len(zs))

        def cell(x, y, z, ix, iy, iz):
            pc = copy(p)
            pc.seed = p.seed + xs[ix]
            pc.prompt = [f"{ys[iy]}{zs[iz]}"] * len(p.prompt)
            res = webui.process_images(pc)
            if grid_infotext[1 + iz] is None and ix == 0 and iy == 0:
                pc.extra_generation_params = copy(pc.extra_generation_params)
                pc.extra_generation_params["Script"] = self.title()
                grid_infotext[1 + iz] = create_infotext(pc, pc.all_prompts, pc.all_seeds, pc.all_subseeds,
                                                        all_negative_prompts=pc.all_negative_prompts)
            if grid_infotext[0] is None and ix == 0 and iy == 0 and iz == 0:
                pc.extra_generation_params = copy(pc.extra_generation_params)
                grid_infotext[0] = create_infotext(pc, pc.all_prompts, pc.all_seeds, pc.all_subseeds,
                                                   all_negative_prompts=pc.all_negative_prompts)
            return res

        processed = draw_xyz_grid(xs, ys, zs, cell, include_lone_images, include_sub_grids, first_axes_processed)
        z_count = len(zs)
        processed.infotexts[:1 + z_count] = grid_infotext[:1 + z_count]
        if not include_lone_images:
            processed.images = processed.images[:z_count + 1]
        if not include_sub_grids:
            for _ in range(z_count):
                del processed.images[1]
                del processed.all_prompts[1]
                del processed.all_seeds[1]
                del processed.infotexts[1]
        return processed


def draw_xyz_grid(xs, ys, zs, cell, include_lone_images, include_sub_grids, first_axes_processed):
    list_size = len(xs) * len(ys) * len(zs)
    processed_result = None

    def process_cell(x, y, z, ix, iy, iz):
        nonlocal processed_result
        processed = cell(x, y, z, ix, iy, iz)
        if processed_result is None:
            processed_result = copy(processed)
            processed_result.images = [None] * list_size
            processed_result.all_prompts = [None] * list_size
            processed_result.all_seeds = [None] * list_size
            processed_result.infotexts = [None] * list_size
            processed_result.index_of_first_image = 1
        idx = ix + iy * len(xs) + iz * len(xs) * len(ys)
        processed_result.images[idx] = processed.images[0]
        processed_result.all_prompts[idx] = processed.all_prompts[0]
        processed_result.all_seeds[idx] = processed.seed
        processed_result.infotexts[idx] = processed.infotexts[0]

    if first_axes_processed == "x":          # e.g. a checkpoint on X: the cells run out of the images' order
        for ix, x in enumerate(xs):
            for iy, y in enumerate(ys):
                for iz, z in enumerate(zs):
                    process_cell(x, y, z, ix, iy, iz)
    else:
        for iz, z in enumerate(zs):
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    process_cell(x, y, z, ix, iy, iz)
    z_count = len(zs)
    for i in range(z_count):
        start_index = (i * len(xs) * len(ys)) + i
        processed_result.images.insert(i, Image.new("RGB", (W, H)))
        processed_result.all_prompts.insert(i, processed_result.all_prompts[start_index])
        processed_result.all_seeds.insert(i, processed_result.all_seeds[start_index])
        processed_result.infotexts.insert(i, processed_result.infotexts[start_index])
    processed_result.images.insert(0, Image.new("RGB", (W, H)))
    processed_result.infotexts.insert(0, processed_result.infotexts[0])
    return processed_result


def run_xyz(host, *, mode="keep best K", batch_size=1, xs=(0, 10), ys=("a red cube", "a blue sphere"), zs=("",),
            lone=True, sub_grids=False, first="z"):
    args = [True, mode, 1, 0.0, "ict*hp", True]
    xyz = XYZ()
    p = P(list(PROMPTS[:batch_size]), batch_size, 1, host.out)
    p.scripts = Runner(host.script, args, [xyz])
    p.script_args = (1, *args)
    res = xyz.run(host.webui, p, list(xs), list(ys), list(zs), lone, sub_grids, first)
    assert p.scripts.errors == []
    return p, res


@pytest.mark.parametrize("first", ["z", "x"])
@pytest.mark.parametrize("zs,sub_grids", [(("",), False), ((" at noon", " at night"), True),
                                          ((" at noon", " at night"), False)])
def test_xyz_score_list_follows_the_images_returned(installed, first, zs, sub_grids):
    """One value per image returned after the grid, in order (sub-grids: none), equal to each image's own infotext;
    whichever axis runs first; no grid infotext carries a score."""
    p, res = run_xyz(installed, xs=(0, 10, 20), zs=zs, sub_grids=sub_grids, first=first)
    egp = api_info(res)["extra_generation_params"]
    returned = res.images[res.index_of_first_image:]
    own = scores_of(res)
    assert len(egp["ICT score"]) == len(returned) == len(own) == (len(zs) if sub_grids else 0) + 3 * 2 * len(zs)
    assert egp["ICT score"] == own and egp["HP score"] == scores_of(res, "HP score")
    cells = own[len(zs) if sub_grids else 0:]
    assert all(v is not None for v in cells) and len(set(cells)) == len(cells)
    for img, value in zip(res.images[res.index_of_first_image + (len(zs) if sub_grids else 0):], cells):
        assert img.info["ict_score"] == value                          # the image itself says the same
    grids = res.infotexts[:1 + (len(zs) if sub_grids else 0)]
    assert grids[0] is not None and all("ICT score" not in t and "HP score" not in t for t in grids)


def test_xyz_whose_cells_cannot_be_placed_returns_no_score_list(installed, monkeypatch):
    """An X/Y/Z whose code differs from A1111's (its cell not found on the stack): no list rather than a wrong one."""
    from ict_webui import plots
    monkeypatch.setattr(plots, "find_cell", lambda *a: None)
    p, res = run_xyz(installed, xs=(0, 10, 20))
    egp = api_info(res)["extra_generation_params"]
    assert "ICT score" not in egp and "HP score" not in egp and len(egp[MSG]) == 1
    assert all(v is not None for v in scores_of(res))             # each image still carries its own score


def test_xyz_without_sub_images_returns_no_score_list(installed):
    p, res = run_xyz(installed, lone=False)
    assert len(res.images) == 1 and "ICT score" not in api_info(res)["extra_generation_params"]
    assert "ICT score" not in res.infotexts[0]


def test_xyz_cells_that_return_their_own_grid_have_no_score(installed):
    """With a batch of 2 each cell returns its grid first, which X/Y/Z takes: no image returned has a score."""
    p, res = run_xyz(installed, batch_size=2)
    assert all(v is None for v in scores_of(res))
    assert "ICT score" not in api_info(res)["extra_generation_params"]


def test_xyz_notice_reaches_the_api_once_and_the_ui(installed):
    p, res = run_xyz(installed, mode="keep best K")
    messages = api_info(res)["extra_generation_params"][MSG]
    assert len(messages) == 1 and "X/Y/Z plot" in messages[0] and "annotate" in messages[0]
    assert list(p.comments) == messages and installed.gr.warnings == messages
    assert all(MSG not in t for t in res.infotexts)


# =============================================================================================== Prompt matrix
class PromptMatrix:
    """scripts/prompt_matrix.py: one generation of every combination (no grid of its own), then a grid put first,
    its infotext a copy of the first image's."""
    filename = "scripts/prompt_matrix.py"

    def title(self):
        return "Prompt matrix"

    def run(self, webui, p):
        parts = ["a cat", "red", "on a table"]
        all_prompts = [", ".join([parts[0]] + [x for j, x in enumerate(parts[1:]) if i & (1 << j)])
                       for i in range(1 << (len(parts) - 1))]
        p.n_iter = math.ceil(len(all_prompts) / p.batch_size)
        p.do_not_save_grid = True
        p.prompt = all_prompts
        processed = webui.process_images(p)
        processed.images.insert(0, Image.new("RGB", (W, H)))
        processed.index_of_first_image = 1
        processed.infotexts.insert(0, processed.infotexts[0])
        return processed


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_prompt_matrix_score_list_follows_the_images_returned(installed, batch_size):
    args = [True, "keep best K", 1, 0.0, "ict*hp", True]
    pm = PromptMatrix()
    p = P(["x"], batch_size, 1, installed.out)
    p.scripts = Runner(installed.script, args, [pm])
    p.script_args = (1, *args)
    res = pm.run(installed.webui, p)
    egp = api_info(res)["extra_generation_params"]
    returned = res.images[res.index_of_first_image:]
    assert len(returned) == 4 and res.all_seeds == [1000, 1001, 1002, 1003]       # annotate: every image
    assert egp["ICT score"] == scores_of(res) and len(egp["ICT score"]) == len(returned)
    assert egp["HP score"] == scores_of(res, "HP score") and None not in egp["ICT score"]
    assert any("Prompt matrix" in m for m in egp[MSG])


# =============================================================================================== messages
def test_no_model_message_reaches_api_clients(host):
    p, res = run(host, mode="keep best K", k=1)
    messages = api_info(res)["extra_generation_params"][MSG]
    assert len(messages) == 1 and "no ICT model found" in messages[0]
    assert list(p.comments) == messages and host.gr.warnings == messages
    assert all(MSG not in t and "no ICT model" not in t for t in res.infotexts)      # never in an infotext


def test_bad_file_message_reaches_api_clients(host, tiny_models):
    host.models.mkdir(parents=True)
    data = Path(tiny_models.ict).read_bytes()
    (host.models / "ict.safetensors").write_bytes(data[:len(data) // 2])
    p, res = run(host, mode="keep best K", k=1)
    (msg,) = api_info(res)["extra_generation_params"][MSG]
    assert "is truncated" in msg and msg == next(iter(p.comments))


def test_a_run_without_messages_adds_no_key(installed):
    p, res = run(installed, mode="keep best K", k=2)
    assert MSG not in api_info(res)["extra_generation_params"]


# =============================================================================================== memory
def test_unload_gives_the_memory_back(installed, monkeypatch):
    """'unload' frees the models, the tokenizer's tables, and trims glibc's heaps (malloc_trim(0))."""
    import ctypes

    from ict_core import text
    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    real = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: Libc() if name == "libc.so.6" else real(name, *a, **k))
    monkeypatch.setattr(text, "release", lambda: calls.append(("tokenizer",)))
    monkeypatch.setattr(sys, "platform", "linux")
    installed.opts.data["ict_reward_after"] = "unload"
    run(installed, mode="annotate")
    assert not installed.module.REWARD.holder.loaded
    assert calls == [("tokenizer",), ("trim", 0)]
    calls.clear()
    installed.opts.data["ict_reward_after"] = "move to CPU"
    run(installed, mode="annotate")
    assert installed.module.REWARD.holder.loaded and calls == []                     # kept: nothing trimmed


def test_trim_is_skipped_where_there_is_no_glibc(monkeypatch):
    import ctypes

    from ict_webui.holder import give_back_memory

    def no_glibc(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert give_back_memory() is False
    monkeypatch.setattr(sys, "platform", "win32")
    assert give_back_memory() is False


# =============================================================================================== hints
SITE = '''
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["ICT_HINT_ROOT"])
import ict_core.config as arch_config
arch_config.VIT_H_14 = json.loads(Path(os.environ["ICT_HINT_CONFIG"]).read_text())
'''


def run_hint(msg: str, tiny_models, tmp_path) -> subprocess.CompletedProcess:
    """Run the one command between backticks in `msg`, from another folder, as a user pastes it into a shell; the
    hub is a local server answering as the hub does with the released layouts of the tiny models (tests/fake_hub.py,
    HF_ENDPOINT), and the default architecture the tiny one (sitecustomize)."""
    from fake_hub import FakeHub

    assert msg.count("`") == 2, msg
    cmd = msg.split("`")[1]
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    with FakeHub({"8y/ICT": tiny_models.ict_src, "8y/HP": tiny_models.hp_src}) as hub:
        env = dict(os.environ, PYTHONPATH=str(site), ICT_HINT_ROOT=str(ROOT),
                   ICT_HINT_CONFIG=str(tiny_models.config), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        env.pop("HF_HUB_OFFLINE", None)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        return subprocess.run(cmd, shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)


def test_the_fetch_hint_runs_as_printed(host, tiny_models, tmp_path):
    p, res = run(host, mode="keep best K", k=1)
    (msg,) = p.comments
    assert "ict fetch" not in msg and "-m ict_core fetch --hp --dest" in msg and str(host.models) in msg
    done = run_hint(msg, tiny_models, tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(f.name for f in host.models.iterdir() if not f.name.startswith(".")) == ["hp.safetensors",
                                                                                              "ict.safetensors"]
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())
    host.webui.saved.clear()
    p, res = run(host, mode="keep best K", k=1)
    assert not p.comments and len(image_outputs(res)[0]) == 1 and "ICT score" in res.infotexts[0]


@pytest.mark.parametrize("name", ["ict.safetensors", "pytorch_model.bin"])
def test_the_pickle_hint_runs_as_printed(host, tiny_models, tmp_path, name):
    """A pickle saved as models/ict/ict.safetensors (or lying there as pytorch_model.bin): the message's command
    converts it beside itself, and the next generation is scored."""
    host.models.mkdir(parents=True)
    shutil.copy(tiny_models.ict_src / "pytorch_model.bin", host.models / name)
    p, res = run(host, mode="keep best K", k=1, use_hp=False, by="ict")
    (msg,) = p.comments
    assert "is a PyTorch pickle" in msg and "-m ict_core convert" in msg and "--out model.safetensors" not in msg
    done = run_hint(msg, tiny_models, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any((tmp_path / "elsewhere").iterdir())                  # nothing written where it ran
    from ict_core.weights import read_kind
    assert sorted(f.name for f in host.models.iterdir()) == ["ict.bin", "ict.safetensors"] if name.endswith(
        ".safetensors") else ["pytorch_model.bin", "pytorch_model.safetensors"]
    assert read_kind(host.models / sorted(f.name for f in host.models.iterdir())[1]) == "ict"
    p, res = run(host, mode="keep best K", k=1, use_hp=False, by="ict")
    assert not p.comments and len(image_outputs(res)[0]) == 1 and "ICT score" in res.infotexts[-1]


def test_hints_are_written_for_this_webui():
    from ict_webui import hints
    cmd = hints.command("fetch", "--hp", "--dest", "/a b/models/ict")
    assert cmd.startswith(f"cd {hints._quote(str(ROOT))} && {hints._quote(sys.executable)} -m ict_core fetch")
    assert "'/a b/models/ict'" in cmd or '"/a b/models/ict"' in cmd
    assert hints.runnable("x `ict fetch --dest \"/m n\"` y") == f"x `{hints.command('fetch', '--dest', '/m n')}` y"
    assert hints.runnable("`cd x` and `ict 'unbalanced`") == "`cd x` and `ict 'unbalanced`"
    assert hints.runnable("not written by `ict convert`") == "not written by `ict convert`"     # the tool's name
