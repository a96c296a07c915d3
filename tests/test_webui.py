"""The webui extension, driven without the webui: a small stand-in for `modules.*` (and gradio) built here, in the
tests only, replays the parts of A1111 1.10 / Forge `process_images_inner` that matter (batch slicing of
p.all_* by n*batch_size, postprocess_batch_list before saving, infotext(i) from p.prompts/p.seeds with callable
extra_generation_params, images.save_image with before_image_saved callbacks, the grid, Processed.all_*), and the
tiny ICT/HP models of conftest.py do the scoring."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from ict_core import Scorer, ranking
from ict_webui import (
    RunArgs,
    ScorerHolder,
    Settings,
    align,
    clean_prompt,
    find_models,
    png_keys_from_infotext,
    scores_from_infotext,
)
from ict_webui.infotext import STATE_ATTR, ScoreField
from ict_webui.options import AFTER_CPU, AFTER_KEEP, AFTER_UNLOAD, OPTIONS

ROOT = Path(__file__).resolve().parents[1]
H, W = 40, 56


# =============================================================================================== the stand-in
def seed_image(seed: int) -> torch.Tensor:
    """What the 'sampler' makes for a seed: a CHW float tensor in 0..1 (the type of pp.images in the webui)."""
    g = torch.Generator().manual_seed(int(seed))
    base = torch.rand(3, 1, 1, generator=g)
    return (0.6 * base + 0.4 * torch.rand(3, H, W, generator=g)).clamp(0, 1)


def to_pil(x: torch.Tensor) -> Image.Image:
    arr = (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)
    return Image.fromarray(arr)


class Opts:
    def __init__(self):
        self.data = {}
        self.added = {}

    def add_option(self, key, info):
        self.added[key] = info

    def __getattr__(self, item):
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        raise AttributeError(item)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.category_id, self.comment_after = section, category_id, comment_after
        self.do_not_save = False

    def info(self, text):
        self.comment_after += f"({text})"
        return self


class State:
    """modules.shared_state.State as far as the extension touches it; each change of what /sdapi/v1/progress reads
    is recorded in `seen` (textinfo, job_no, job_count, sampling_step, sampling_steps)."""
    interrupted = False
    stopping_generation = False
    textinfo = None
    job = ""
    job_no = job_count = sampling_step = sampling_steps = 0
    WATCHED = ("textinfo", "job_no", "job_count", "sampling_step", "sampling_steps")

    def __init__(self):
        self.seen = []
        self.jobs = []

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.WATCHED and self.job:
            self.seen.append({"changed": name, **{k: getattr(self, k) for k in self.WATCHED}})

    def begin(self, job="(unknown)"):
        self.sampling_step, self.job_count, self.job_no = 0, -1, 0
        self.interrupted = self.stopping_generation = False
        self.textinfo, self.job = None, job
        self.jobs.append(job)

    def end(self):
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def progress(self):
        """What /sdapi/v1/progress answers (modules/api/api.py progressapi), without the ETA."""
        if self.job_count == 0:
            return 0
        progress = 0.01
        if self.job_count > 0:
            progress += self.job_no / self.job_count
        if self.sampling_steps > 0:
            progress += 1 / self.job_count * self.sampling_step / self.sampling_steps
        return min(progress, 1)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


class Callbacks:
    def __init__(self):
        self.ui_settings, self.before_image_saved, self.app_started = [], [], []


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class Script:
    sorting_priority = 0

    def title(self):
        raise NotImplementedError


ALWAYS_VISIBLE = object()


class SelectableScript:
    """A script of the Script dropdown (only its title and file name matter here)."""

    def __init__(self, title, filename="scripts/other.py"):
        self._title, self.filename = title, filename

    def title(self):
        return self._title


class Runner:
    """ScriptRunner: always-on scripts get their slice of p.script_args; errors are reported, not raised."""

    def __init__(self, script, args, selectable=()):
        self.script, self.args, self.errors = script, list(args), []
        self.selectable_scripts = list(selectable)

    def _call(self, name, p, *a, **kw):
        fn = getattr(self.script, name, None)
        if fn is None:
            return
        try:
            fn(p, *a, *self.args, **kw)
        except Exception as e:      # the webui's errors.report(...) and carry on
            self.errors.append((name, e))

    def process(self, p):
        self._call("process", p)

    def postprocess_batch_list(self, p, pp, **kw):
        self._call("postprocess_batch_list", p, pp, **kw)

    def postprocess_image(self, p, pp):
        self._call("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)


class P:
    """StableDiffusionProcessing: only what process_images_inner and the extension touch."""

    def __init__(self, prompts, batch_size, n_iter, outdir, seed=1000, negative="blurry", **extra):
        self.prompt = prompts
        self.negative_prompt = negative
        self.batch_size, self.n_iter = batch_size, n_iter
        self.seed, self.subseed = seed, 5000
        self.outpath_samples = str(outdir)
        self.extra_generation_params = {}
        self.comments = {}
        self.scripts = None
        self.iteration = 0
        self.steps = 20
        for k, v in extra.items():
            setattr(self, k, v)

    def comment(self, text):
        self.comments[text] = 1


class Processed:
    def __init__(self, p, images, seed, info, subseed, index_of_first_image, infotexts):
        self.images, self.seed, self.info, self.subseed = images, seed, info, subseed
        self.index_of_first_image, self.infotexts = index_of_first_image, infotexts
        self.all_prompts, self.all_negative_prompts = p.all_prompts, p.all_negative_prompts
        self.all_seeds, self.all_subseeds = p.all_seeds, p.all_subseeds
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.extra_generation_params = p.extra_generation_params

    def js(self):
        """Forge Classic's Processed.js(): json.dumps without a fallback (A1111 passes default=lambda o: None)."""
        return json.dumps({"all_seeds": self.all_seeds, "infotexts": self.infotexts,
                           "extra_generation_params": self.extra_generation_params})


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0,
                    position_in_batch=0, use_main_prompt=False, index=None, all_negative_prompts=None):
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    params = {"Steps": p.steps, "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
              "Variation seed": p.all_subseeds[0] if use_main_prompt else all_subseeds[index],
              **p.extra_generation_params}
    for key, value in params.items():
        if isinstance(value, list):
            params[key] = value[index]
        elif callable(value):
            params[key] = value(**locals())
    line = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    return f"{prompt_text}\nNegative prompt: {negative}\n{line}"


class Webui:
    """modules.processing.process_images_inner as far as the extension can tell."""

    def __init__(self, callbacks: Callbacks, outdir: Path):
        self.callbacks, self.outdir, self.counter = callbacks, outdir, 0
        self.saved: list[Path] = []

    def save_image(self, image, seed, prompt, info, p):
        self.counter += 1
        fn = self.outdir / f"{self.counter:05d}-{seed}.png"
        params = ImageSaveParams(image, p, str(fn), {"parameters": info})
        for cb in self.callbacks.before_image_saved:
            cb(params)
        png = PngImagePlugin.PngInfo()
        for k, v in params.pnginfo.items():
            png.add_text(k, str(v))
        params.image.save(fn, pnginfo=png)
        self.saved.append(fn)

    def process_images(self, p):
        bs = p.batch_size
        total = bs * p.n_iter
        p.all_prompts = list(p.prompt) if isinstance(p.prompt, list) else [p.prompt] * total
        p.all_negative_prompts = [p.negative_prompt] * len(p.all_prompts)
        p.main_prompt, p.main_negative_prompt = p.all_prompts[0], p.all_negative_prompts[0]
        p.all_seeds = [p.seed + i for i in range(len(p.all_prompts))]
        p.all_subseeds = [p.subseed + i for i in range(len(p.all_prompts))]
        if getattr(p, "enable_hr", False):
            p.all_hr_prompts = [f"hr {t}" for t in p.all_prompts]
            p.all_hr_negative_prompts = list(p.all_negative_prompts)
        p.used_overlays = []
        p.scripts.process(p)
        infotexts, output_images = [], []
        for n in range(p.n_iter):
            p.iteration = n
            sl = slice(n * bs, (n + 1) * bs)
            p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]
            p.seeds, p.subseeds = p.all_seeds[sl], p.all_subseeds[sl]
            if getattr(p, "enable_hr", False):
                p.hr_prompts, p.hr_negative_prompts = p.all_hr_prompts[sl], p.all_hr_negative_prompts[sl]
            x_samples = torch.stack([seed_image(s) for s in p.seeds])
            if getattr(p, "bad_image_at", None) is not None and n == 0:
                x_samples[p.bad_image_at] = float("nan")

            p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]   # as the webui does
            batch_params = PostprocessBatchListArgs(list(x_samples))
            p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
            x_samples = batch_params.images

            def infotext(index=0, use_main_prompt=False):
                return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt,
                                            index=index, all_negative_prompts=p.negative_prompts)

            for i, x in enumerate(x_samples):
                p.batch_index = i
                image = to_pil(torch.nan_to_num(x))
                pp = PostprocessImageArgs(image)
                p.scripts.postprocess_image(p, pp)
                image = pp.image
                if getattr(p, "overlay_images", None) is not None and i < len(p.overlay_images):
                    p.used_overlays.append((p.seeds[i], p.overlay_images[i]))
                self.save_image(image, p.seeds[i], p.prompts[i], infotext(i), p)
                text = infotext(i)
                infotexts.append(text)
                image.info["parameters"] = text
                output_images.append(image)
        index_of_first_image = 0
        if len(output_images) >= 2 and not getattr(p, "do_not_save_grid", False):
            grid = Image.new("RGB", (W * len(output_images), H))
            for j, im in enumerate(output_images):
                grid.paste(im, (j * W, 0))
            text = infotext(use_main_prompt=True)
            infotexts.insert(0, text)
            grid.info["parameters"] = text
            output_images.insert(0, grid)
            index_of_first_image = 1
        res = Processed(p, output_images, p.all_seeds[0], infotexts[0], p.all_subseeds[0], index_of_first_image,
                        infotexts)
        p.scripts.postprocess(p, res)
        return res


# =============================================================================================== fixtures
class FakeGradio(types.ModuleType):
    """Enough of gradio for Script.ui(): components remember their kwargs."""

    class _Component:
        def __init__(self, *a, **kw):
            self.args, self.kwargs = a, kw
            self.value = kw.get("value")

    class _Block(_Component):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class _Progress:
        """gr.Progress: a handler whose argument defaults to one gets a tracker; here the calls are kept."""
        def __init__(self, track_tqdm=False):
            self.calls = []

        def __call__(self, progress=None, desc=None, total=None, unit="steps"):
            self.calls.append((progress, desc))

    def _click(self, fn=None, inputs=None, outputs=None, **kw):
        self.handlers = [*getattr(self, "handlers", []), (fn, inputs, outputs)]

    def __init__(self):
        super().__init__("gradio")
        self.Checkbox = type("Checkbox", (self._Component,), {})
        self.Radio = type("Radio", (self._Component,), {})
        self.Slider = type("Slider", (self._Component,), {})
        self.Accordion = type("Accordion", (self._Block,), {})
        self.Row = type("Row", (self._Block,), {})
        self.HTML = type("HTML", (self._Component,), {})
        self.Button = type("Button", (self._Component,), {"click": FakeGradio._click})
        self.Progress = FakeGradio._Progress
        self.warnings = []
        self.Warning = lambda msg: self.warnings.append(msg)


@pytest.fixture()
def host(tmp_path, monkeypatch):
    """The stand-in modules.* + gradio in sys.modules, and scripts/ict_reward.py loaded on top of them."""
    cb = Callbacks()
    opts = Opts()
    webui_root = tmp_path / "webui"
    (webui_root / "models").mkdir(parents=True)
    modules = types.ModuleType("modules")
    m_scripts = types.ModuleType("modules.scripts")
    m_scripts.Script, m_scripts.AlwaysVisible = Script, ALWAYS_VISIBLE
    m_scripts.PostprocessBatchListArgs, m_scripts.PostprocessImageArgs = PostprocessBatchListArgs, PostprocessImageArgs
    m_shared = types.ModuleType("modules.shared")
    m_shared.opts, m_shared.state, m_shared.OptionInfo = opts, State(), OptionInfo
    m_paths = types.ModuleType("modules.paths")
    m_paths.models_path = str(webui_root / "models")
    m_devices = types.ModuleType("modules.devices")
    device_asks = []
    m_devices.get_device_for = lambda task: device_asks.append(task) or torch.device("cpu")   # --use-cpu all
    m_cb = types.ModuleType("modules.script_callbacks")
    m_cb.on_ui_settings = cb.ui_settings.append
    m_cb.on_before_image_saved = cb.before_image_saved.append
    m_cb.on_app_started = cb.app_started.append
    m_shared.cmd_opts = types.SimpleNamespace(api=True, nowebui=False, api_auth=None)
    m_call_queue = types.ModuleType("modules.call_queue")
    m_call_queue.queue_lock = threading.Lock()       # what generations hold (a FIFOLock in the webui)
    for name, mod in (("scripts", m_scripts), ("shared", m_shared), ("paths", m_paths), ("script_callbacks", m_cb),
                      ("devices", m_devices), ("call_queue", m_call_queue)):
        setattr(modules, name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    monkeypatch.setitem(sys.modules, "modules", modules)
    gr = FakeGradio()
    monkeypatch.setitem(sys.modules, "gradio", gr)
    monkeypatch.setenv("ICT_MODELS_DIR", str(tmp_path / "no-default-models"))   # keep ~ out of it

    spec = importlib.util.spec_from_file_location("ict_reward_script_under_test", ROOT / "scripts" / "ict_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    out.mkdir()
    h = types.SimpleNamespace(module=module, script=module.ICTRewardScript(), callbacks=cb, opts=opts, gr=gr,
                              models=webui_root / "models" / "ict", webui=Webui(cb, out), out=out, state=m_shared.state,
                              device_asks=device_asks, queue_lock=m_call_queue.queue_lock)
    for f in cb.ui_settings:
        f()
    return h


@pytest.fixture()
def installed(host, tiny_models):
    """Tiny ICT + HP weights in the webui's models/ict folder."""
    host.models.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_models.ict, host.models / "ict.safetensors")
    shutil.copy(tiny_models.hp, host.models / "hp.safetensors")
    return host


@pytest.fixture(scope="module")
def reference_scorer(tiny_models):
    return Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu", precision="fp32")


PROMPTS = ["a red cube on a table", "a (blue:1.2) sphere <lora:shiny:0.7>", "a green pyramid", "a yellow torus",
           "a photo of a cat", "a photo of a dog", "a city at night", "a [forest:lake:5] at dawn"]


def run(host, *, mode="keep best K", k=2, by="ict*hp", use_hp=True, min_score=0.0, batch_size=4, n_iter=1,
        enabled=True, prompts=None, selected=None, **extra):
    """`selected`: a script chosen in the Script dropdown (p.script_args[0] is its index + 1, as in the webui)."""
    total = batch_size * n_iter
    prompts = prompts if prompts is not None else (PROMPTS * 4)[:total]
    p = P(list(prompts), batch_size, n_iter, host.out, **extra)
    args = [enabled, mode, k, min_score, by, use_hp]
    others = [SelectableScript("Prompts from file or textbox")] + ([selected] if selected is not None else [])
    p.scripts = Runner(host.script, args, others)
    p.script_args = (len(others) if selected is not None else 0, *args)
    res = host.webui.process_images(p)
    assert p.scripts.errors == []
    return p, res


def params_line(text: str) -> dict[str, str]:
    out = {}
    for part in text.strip().splitlines()[-1].split(", "):
        k, _, v = part.partition(": ")
        out[k] = v
    return out


def image_outputs(res):
    return res.images[res.index_of_first_image:], res.infotexts[res.index_of_first_image:]


def check_alignment(res, p, host, reference_scorer, seed_to_prompt):
    """Every returned / saved image is the one its seed made, with its own prompt, and its own score."""
    images, infos = image_outputs(res)
    assert len(res.all_seeds) == len(images) == len(res.all_prompts) == len(res.all_subseeds)
    assert len(host.webui.saved) == len(images)
    for j, (img, info, path) in enumerate(zip(images, infos, host.webui.saved)):
        params = params_line(info)
        seed = int(params["Seed"])
        assert res.all_seeds[j] == seed
        assert res.all_subseeds[j] == int(params["Variation seed"]) == seed - 1000 + 5000
        assert res.all_prompts[j] == seed_to_prompt[seed] == info.splitlines()[0]
        assert path.name.endswith(f"-{seed}.png")
        expected = to_pil(seed_image(seed))
        assert np.array_equal(np.asarray(img), np.asarray(expected)), f"image {j} is not the image of seed {seed}"
        with Image.open(path) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(expected))
            assert saved.text["parameters"] == info
            assert saved.text["ict_score"] == params["ICT score"]
            assert saved.text["hp_score"] == params["HP score"]
        assert img.info["ict_score"] == params["ICT score"]
        r = reference_scorer.score([seed_image(seed)], clean_prompt(seed_to_prompt[seed]))[0]
        assert float(params["ICT score"]) == pytest.approx(r.ict, abs=2e-4)
        assert float(params["HP score"]) == pytest.approx(r.hp, abs=2e-4)


def reference_batch(reference_scorer, seeds, seed_to_prompt, by="ict*hp"):
    results = reference_scorer.score([seed_image(s) for s in seeds], [clean_prompt(seed_to_prompt[s]) for s in seeds])
    return results, ranking.values(results, by)


# =============================================================================================== end to end
@pytest.mark.parametrize("n_iter", [1, 2])
def test_keep_best_k_keeps_images_seeds_prompts_and_scores_aligned(installed, reference_scorer, n_iter):
    p, res = run(installed, mode="keep best K", k=2, n_iter=n_iter)
    seed_to_prompt = dict(zip([1000 + i for i in range(4 * n_iter)], (PROMPTS * 4)[:4 * n_iter]))
    check_alignment(res, p, installed, reference_scorer, seed_to_prompt)
    images, infos = image_outputs(res)
    assert len(images) == 2 * n_iter
    assert res.index_of_first_image == 1 and "ICT score" not in res.infotexts[0]     # grid: rebuilt, no score
    for n in range(n_iter):                      # each batch judged on its own: its own two best, best first
        seeds = [1000 + 4 * n + i for i in range(4)]
        _, vals = reference_batch(reference_scorer, seeds, seed_to_prompt)
        best = [seeds[i] for i in sorted(range(4), key=lambda i: -vals[i])[:2]]
        assert res.all_seeds[2 * n:2 * n + 2] == best
    assert p.all_seeds == res.all_seeds and p.all_prompts == res.all_prompts
    assert res.seed == res.all_seeds[0]


@pytest.mark.parametrize("n_iter", [1, 2])
def test_rerank_orders_each_batch_best_first_and_keeps_everything(installed, reference_scorer, n_iter):
    p, res = run(installed, mode="rerank", n_iter=n_iter, by="ict")
    seed_to_prompt = dict(zip([1000 + i for i in range(4 * n_iter)], (PROMPTS * 4)[:4 * n_iter]))
    check_alignment(res, p, installed, reference_scorer, seed_to_prompt)
    assert sorted(res.all_seeds) == list(range(1000, 1000 + 4 * n_iter))
    for n in range(n_iter):
        batch = res.all_seeds[4 * n:4 * n + 4]
        assert sorted(batch) == list(range(1000 + 4 * n, 1004 + 4 * n))          # batches never mix
        _, vals = reference_batch(reference_scorer, batch, seed_to_prompt, by="ict")
        assert vals == sorted(vals, reverse=True)


def test_annotate_keeps_order(installed, reference_scorer):
    p, res = run(installed, mode="annotate", n_iter=2)
    seed_to_prompt = dict(zip(range(1000, 1008), PROMPTS))
    check_alignment(res, p, installed, reference_scorer, seed_to_prompt)
    assert res.all_seeds == list(range(1000, 1008))


def test_min_score_keeps_those_reaching_it_or_the_single_best(installed, reference_scorer):
    seed_to_prompt = dict(zip(range(1000, 1004), PROMPTS))
    _, vals = reference_batch(reference_scorer, list(range(1000, 1004)), seed_to_prompt, by="ict")
    cut = sorted(vals, reverse=True)[1]                 # exactly two reach it
    p, res = run(installed, mode="min score", by="ict", min_score=cut - 1e-6)
    check_alignment(res, p, installed, reference_scorer, seed_to_prompt)
    assert len(image_outputs(res)[0]) == 2
    installed.webui.saved.clear()
    p, res = run(installed, mode="min score", by="ict", min_score=0.999)
    assert len(image_outputs(res)[0]) == 1
    assert any("keeping the single best" in c for c in p.comments)


def test_k_larger_than_the_batch_keeps_all_best_first(installed, reference_scorer):
    p, res = run(installed, mode="keep best K", k=9, batch_size=3, by="ict")
    seed_to_prompt = dict(zip(range(1000, 1003), PROMPTS))
    check_alignment(res, p, installed, reference_scorer, seed_to_prompt)
    assert sorted(res.all_seeds) == [1000, 1001, 1002]
    assert any("k=9 is more than" in c for c in p.comments)


def test_group_and_hp_rules(installed, reference_scorer):
    prompts = ["a red cube"] * 4
    p, res = run(installed, mode="keep best K", k=1, by="group", prompts=prompts)
    results, vals = reference_batch(reference_scorer, list(range(1000, 1004)), dict.fromkeys(range(1000, 1004),
                                                                                                "a red cube"),
                                    by="group")
    assert res.all_seeds == [1000 + max(range(4), key=lambda i: vals[i])]


def test_empty_prompts_are_scored_by_hp_alone_when_ranking_by_hp(installed, reference_scorer):
    """HP needs no prompt: ranking by hp scores every image; ranking by ict leaves the blank ones unscored."""
    prompts = ["", "a red cube", "", "a fox"]
    p, res = run(installed, mode="rerank", by="hp", prompts=prompts)
    hp = [r.hp for r in reference_scorer.score([seed_image(1000 + i) for i in range(4)], None)]
    assert res.all_seeds == [1000 + i for i in sorted(range(4), key=lambda i: -hp[i])]
    images, infos = image_outputs(res)
    for seed, info in zip(res.all_seeds, infos):
        assert "HP score" in info and ("ICT score" in info) == bool(prompts[seed - 1000])
    installed.webui.saved.clear()
    p, res = run(installed, mode="rerank", by="ict", prompts=prompts)
    assert sorted(res.all_seeds[2:]) == [1000, 1002]  # unscored: kept, after the scored ones
    assert any("HP alone" in c for c in p.comments)


def test_no_weights_message_and_generation_still_succeeds(host):
    p, res = run(host, mode="keep best K", k=1, n_iter=2)
    images, infos = image_outputs(res)
    assert len(images) == 8 and res.all_seeds == list(range(1000, 1008))     # untouched, unscored
    assert all("ICT score" not in t for t in infos)
    msg = next(iter(p.comments))
    assert "no ICT model found" in msg and "ict_core fetch" in msg and str(host.models) in msg
    assert msg.index("press Settings > ICT reward > Download the official weights") < msg.index("ict_core fetch")
    assert "with no network here: fetch them on a machine with network" in msg and msg.count("`") == 2
    assert host.gr.warnings == [msg]
    assert not host.module.REWARD.holder.loaded
    assert "ict_score" not in Image.open(host.webui.saved[0]).text


def test_hp_missing_falls_back_to_ict(host, tiny_models, reference_scorer):
    host.models.mkdir(parents=True)
    shutil.copy(tiny_models.ict, host.models / "my-ict.safetensors")         # any name: found by its header
    p, res = run(host, mode="keep best K", k=1, by="ict*hp")
    assert any("no HP model" in c for c in p.comments)
    info = res.infotexts[res.index_of_first_image]
    assert "ICT score" in info and "HP score" not in info
    _, vals = reference_batch(reference_scorer, list(range(1000, 1004)), dict(zip(range(1000, 1004), PROMPTS)),
                              by="ict")
    assert res.all_seeds == [1000 + max(range(4), key=lambda i: vals[i])]


def test_unreadable_image_is_kept_unscored_after_the_others(installed):
    p, res = run(installed, mode="rerank", by="ict", bad_image_at=1)
    images, infos = image_outputs(res)
    assert len(images) == 4 and res.all_seeds[-1] == 1001
    assert "ICT score" not in infos[-1] and all("ICT score" in t for t in infos[:-1])
    assert any("image 2 of batch 1 could not be scored" in c for c in p.comments)
    installed.webui.saved.clear()
    p, res = run(installed, mode="keep best K", k=2, by="ict", bad_image_at=1)
    assert len(image_outputs(res)[0]) == 2 and 1001 not in res.all_seeds


def test_img2img_overlays_and_hires_prompts_follow_their_images(installed, reference_scorer):
    overlays = [f"overlay-{i}" for i in range(4)]        # one per batch position, reused by every batch
    corrections = [f"cc-{i}" for i in range(4)]
    p, res = run(installed, mode="keep best K", k=2, n_iter=2, overlay_images=list(overlays),
                 color_corrections=list(corrections), enable_hr=True)
    for seed, overlay in p.used_overlays:
        assert overlay == f"overlay-{(seed - 1000) % 4}"
    assert p.overlay_images == overlays and p.color_corrections == corrections      # restored afterwards
    assert p.all_hr_prompts == [f"hr {t}" for t in res.all_prompts]


def test_disabled_does_nothing_and_loads_nothing(installed):
    p, res = run(installed, enabled=False, mode="keep best K", k=1)
    assert res.all_seeds == [1000, 1001, 1002, 1003]
    assert all("ICT score" not in t for t in res.infotexts)
    assert not installed.module.REWARD.holder.loaded
    assert getattr(p, STATE_ATTR, None) is None


def test_nothing_loads_at_import_and_the_model_is_reused(installed):
    assert not installed.module.REWARD.holder.loaded
    run(installed, mode="annotate")
    holder = installed.module.REWARD.holder
    assert holder.loaded and holder.loads == 1
    run(installed, mode="rerank")
    assert holder.loads == 1


def test_settings_are_registered_and_used(installed):
    assert set(installed.opts.added) == {o.key for o in OPTIONS} | {"ict_reward_download"}
    action = installed.opts.added["ict_reward_download"]
    assert action.do_not_save and action.label == "Download the official weights"
    assert list(installed.opts.added).index("ict_reward_download") == 1     # under the models folder
    for o in OPTIONS:
        info = installed.opts.added[o.key]
        assert info.section == ("ict_reward", "ICT reward") and info.default == o.default
        assert info.category_id == "postprocessing"
    installed.opts.data["ict_reward_after"] = AFTER_UNLOAD
    run(installed, mode="annotate")
    assert not installed.module.REWARD.holder.loaded
    other = installed.models.parent / "elsewhere"
    installed.models.rename(other)
    installed.opts.data["ict_reward_models_dir"] = str(other)
    p, res = run(installed, mode="annotate")
    assert "ICT score" in res.infotexts[1]


def test_ui_components_match_process_args(host):
    comps = host.script.ui(False)
    assert [type(c).__name__ for c in comps] == ["Checkbox", "Radio", "Slider", "Slider", "Radio", "Checkbox"]
    assert host.script.show(False) is ALWAYS_VISIBLE and host.script.show(True) is ALWAYS_VISIBLE
    values = [c.value for c in comps]
    assert RunArgs.from_values(*values) == RunArgs(enabled=False, mode="annotate", k=1, min_score=0.3, by="ict*hp",
                                                   use_hp=True)


# =============================================================================================== units
def test_align_unit_with_forge_neo_comment_lists():
    p = types.SimpleNamespace(batch_size=3, prompts=["a", "b", "c"], seeds=[1, 2, 3], subseeds=[7, 8, 9],
                              negative_prompts=["n1", "n2", "n3"],
                              all_prompts=["x", "y", "z", "a", "b", "c"], all_seeds=[4, 5, 6, 1, 2, 3],
                              all_subseeds=[0, 0, 0, 7, 8, 9], all_negative_prompts=["n"] * 3 + ["n1", "n2", "n3"],
                              _all_prompts_c=["x#", "y#", "z#", "a#", "b#", "c#"])
    st = align.AlignState()
    align.record_untouched(p, 3, 0, st)
    out = align.apply_order(p, ["A", "B", "C"], [2, 0], 1, st)
    assert out == ["C", "A"]
    assert p.prompts == ["c", "a"] and p.seeds == [3, 1] and p.subseeds == [9, 7] and p.negative_prompts == ["n3", "n1"]
    assert p.all_seeds == [4, 5, 6, 3, 1, 2] and p._all_prompts_c[3:] == ["c#", "a#", "b#"]
    processed = types.SimpleNamespace(all_seeds=p.all_seeds, all_prompts=p.all_prompts)
    align.compact(p, st, processed)
    assert p.all_seeds == [4, 5, 6, 3, 1] and p.all_prompts == ["x", "y", "z", "c", "a"]
    assert processed.all_seeds == [4, 5, 6, 3, 1] and p._all_prompts_c == ["x#", "y#", "z#", "c#", "a#"]
    with pytest.raises(ValueError):
        align.apply_order(p, ["A", "B"], [0, 0], 0, st)


def test_align_leaves_lists_another_extension_changed():
    p = types.SimpleNamespace(batch_size=2, prompts=["a", "b"], seeds=[1, 2], all_prompts=["q", "r"],
                              all_seeds=[1, 2])
    st = align.AlignState()
    align.apply_order(p, ["A", "B"], [1], 0, st)
    assert p.prompts == ["b"] and p.all_prompts == ["q", "r"] and p.all_seeds == [2, 1]
    assert align.can_align(types.SimpleNamespace(prompts=["a"], seeds=[1, 2]), 2) is not None


def test_clean_prompt():
    assert clean_prompt("a (red:1.3) cat, <lora:foo:0.8> on a [table:chair:10] BREAK sunny day") == \
        "a red cat, on a chair, sunny day"
    assert clean_prompt("photo of [cat|dog], ((masterpiece)), \\(artist\\)") == "photo of cat, masterpiece, (artist)"
    assert clean_prompt("a AND b AND 0.5 c") == "a, b, c"
    assert clean_prompt("[dog:5] and [cat::0.5]") == "dog and"
    assert clean_prompt("<lora:x:1>") == "" and clean_prompt(None) == ""


def test_infotext_keys_and_png_keys():
    text = "a cat, ICT score: 9\nNegative prompt: x\nSteps: 20, ICT score: 0.3125, HP score: 0.7000, Seed: 1"
    assert scores_from_infotext(text) == {"ict_score": 0.3125, "hp_score": 0.7}
    assert png_keys_from_infotext(text) == {"ict_score": "0.3125", "hp_score": "0.7000"}
    assert png_keys_from_infotext("a\nSteps: 20") == {} and png_keys_from_infotext(None) == {}
    assert scores_from_infotext("x\nSteps: 2, ICT score: -0.05") == {"ict_score": -0.05}
    field = ScoreField("ict")
    assert field(p=object(), index=0) is None and field(p=None, index=0) is None


def test_run_args_are_tolerant():
    a = RunArgs.from_values(True, "keep best K", "3", "0.25", "group", False)
    assert a == RunArgs(True, "keep best K", 3, 0.25, "group", False) and a.needs_hp
    assert RunArgs.from_values() == RunArgs()
    b = RunArgs.from_values(True, "bogus", -5, "nan", "nope", None)
    assert b.mode == "annotate" and b.k == 1 and b.min_score == 0.0 and b.by == "ict*hp" and b.use_hp
    assert not RunArgs.from_values(True, "annotate", 1, 0, "ict", False).needs_hp


def test_settings_defaults(tmp_path):
    s = Settings.from_opts(lambda k, d: d, str(tmp_path / "models"))
    assert s.models_dir == str(tmp_path / "models" / "ict") and (s.device, s.precision, s.after) == (
        "auto", "auto", AFTER_CPU)      # A1111: the GPU is given back after scoring unless asked otherwise
    s = Settings.from_opts(lambda k, d: {"ict_reward_device": "tpu", "ict_reward_models_dir": "~/m"}.get(k, d), None)
    assert s.device == "auto" and not s.models_dir.startswith("~")


def test_find_models_by_name_and_header(tmp_path, tiny_models):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "junk.safetensors").write_bytes(b"not a model")
    shutil.copy(tiny_models.hp, a / "x.safetensors")
    shutil.copy(tiny_models.ict, b / "ict.safetensors")
    assert find_models([a, b]) == (b / "ict.safetensors", a / "x.safetensors")
    assert find_models([tmp_path / "none"]) == (None, None)


def test_holder_offload_policies(tiny_models):
    loads = []

    def loader(ict, hp, device, precision, run_device=None):
        loads.append((ict, hp))
        return Scorer.load(ict, hp, device=device, precision=precision, run_device=run_device)

    h = ScorerHolder(loader)
    s = h.get(tiny_models.ict, None, "cpu", "fp32")
    assert h.get(tiny_models.ict, None, "cpu", "fp32") is s and len(loads) == 1
    h.release(AFTER_CPU)
    assert h.loaded and str(s.device) == "cpu"
    s2 = h.get(tiny_models.ict, tiny_models.hp, "cpu", "fp32")         # HP asked for: another load
    assert s2 is not s and s2.has_hp and len(loads) == 2
    h.release(AFTER_UNLOAD)
    assert not h.loaded


def test_scoring_failure_never_fails_the_generation(installed, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(installed.module.REWARD.holder, "get", boom)
    p, res = run(installed, mode="keep best K", k=1)
    assert res.all_seeds == [1000, 1001, 1002, 1003]
    assert any("scoring failed (RuntimeError: CUDA out of memory)" in c for c in p.comments)


def test_cancel_leaves_batch_unscored(installed):
    installed.state.interrupted = True
    try:
        p, res = run(installed, mode="keep best K", k=1)
    finally:
        installed.state.interrupted = False
    assert res.all_seeds == [1000, 1001, 1002, 1003]
    assert any("cancelled" in c for c in p.comments)


def test_batch_with_more_images_than_prompts_is_left_alone(installed):
    class Frames:                      # a "video" batch: 6 frames for 1 prompt (Forge Neo's Wan path)
        def process(self, p, *a):
            installed.script.process(p, *a)

        def postprocess_batch_list(self, p, pp, *a, **kw):
            pp.images = pp.images + pp.images[:2]
            installed.script.postprocess_batch_list(p, pp, *a, **kw)
            assert len(pp.images) == 6
            pp.images = pp.images[:4]

        def postprocess_image(self, p, pp, *a):
            installed.script.postprocess_image(p, pp, *a)

        def postprocess(self, p, processed, *a):
            installed.script.postprocess(p, processed, *a)

    p = P(PROMPTS[:4], 4, 1, installed.out)
    p.scripts = Runner(Frames(), [True, "keep best K", 1, 0.0, "ict", True])
    res = installed.webui.process_images(p)
    assert p.scripts.errors == [] and res.all_seeds == [1000, 1001, 1002, 1003]
    assert any("6 images for 4 prompts" in c for c in p.comments)


# =============================================================================================== issue 11
def test_api_info_is_plain_json_with_the_scores(installed):
    """Forge Classic's Processed.js() has no JSON fallback: everything in extra_generation_params must be JSON, and
    the API's info carries the scores (one per image kept, as the infotexts say), not nulls."""
    p, res = run(installed, mode="keep best K", k=2, n_iter=2)
    egp = json.loads(res.js())["extra_generation_params"]
    images, infos = image_outputs(res)
    assert len(infos) == 4
    assert egp["ICT score"] == [params_line(t)["ICT score"] for t in infos]
    assert egp["HP score"] == [params_line(t)["HP score"] for t in infos]


def test_infotext_fields_are_json_while_the_run_is_on(installed):
    """A run that stops before postprocess (interrupted, another script's error) must not break the API either."""
    p = P(PROMPTS[:4], 4, 1, installed.out)
    args = [True, "keep best K", 1, 0.0, "ict*hp", True]
    p.scripts = Runner(installed.script, args)
    installed.script.process(p, *args)
    field = p.extra_generation_params["ICT score"]
    assert callable(field) and json.loads(json.dumps(p.extra_generation_params)) == {"ICT score": "", "HP score": ""}
    import copy
    assert isinstance(copy.deepcopy(field), ScoreField) and copy.copy(field).which == "ict"


def test_no_scores_leave_no_infotext_field(host):
    p, res = run(host, mode="keep best K", k=1)
    assert "ICT score" not in json.loads(res.js())["extra_generation_params"]


@pytest.mark.parametrize("bad", ["truncated", "unconverted", "pickle", "pickle beside"])
def test_an_invalid_model_file_shows_the_engines_message(host, tiny_models, bad):
    from safetensors.torch import save_file
    host.models.mkdir(parents=True)
    f = host.models / "ict.safetensors"
    data = Path(tiny_models.ict).read_bytes()
    if bad == "truncated":
        f.write_bytes(data[:len(data) // 2])
        expect = "is truncated"
    elif bad == "unconverted":
        save_file({"vision_model.post_layernorm.weight": torch.ones(4)}, str(f))
        expect = "was not written by `ict convert`"
    elif bad == "pickle":
        torch.save({"w": torch.zeros(2)}, f)
        expect = "is a PyTorch pickle"
    else:
        torch.save({"w": torch.zeros(2)}, host.models / "pytorch_model.bin")
        expect = "is a PyTorch pickle"
    p, res = run(host, mode="keep best K", k=1)
    msg = next(iter(p.comments))
    assert expect in msg and "no ICT model found" not in msg and "\n" not in msg and msg.startswith("ICT reward: ")
    assert host.gr.warnings == [msg] and len(image_outputs(res)[0]) == 4


def test_an_invalid_hp_file_is_named_too(host, tiny_models):
    host.models.mkdir(parents=True)
    shutil.copy(tiny_models.ict, host.models / "ict.safetensors")
    (host.models / "hp.safetensors").write_bytes(Path(tiny_models.hp).read_bytes()[:100])
    p, res = run(host, mode="keep best K", k=1, by="ict*hp")
    assert any("hp.safetensors is truncated" in c and "ranking by 'ict'" in c for c in p.comments)


@pytest.mark.parametrize("title,filename", [("Prompt matrix", "scripts/prompt_matrix.py"),
                                            ("Prompt Matrix", "scripts/pm.py"),          # Forge Classic's title
                                            ("X/Y/Z plot", "scripts/xyz_grid.py"),
                                            ("SD upscale", "scripts/sd_upscale.py"),
                                            ("Grid of mine", "extensions/x/scripts/xyz_grid.py")])
@pytest.mark.parametrize("mode", ["keep best K", "rerank", "min score"])
def test_scripts_that_need_every_image_in_place_fall_back_to_annotate(installed, reference_scorer, title, filename,
                                                                      mode):
    p, res = run(installed, mode=mode, k=1, by="ict", min_score=0.99, selected=SelectableScript(title, filename))
    images, infos = image_outputs(res)
    assert res.all_seeds == [1000, 1001, 1002, 1003] and len(images) == 4     # every image, in its place
    check_alignment(res, p, installed, reference_scorer, dict(zip(range(1000, 1004), PROMPTS)))
    assert any(title in c and "annotate" in c and mode in c for c in p.comments)


def test_other_selected_scripts_still_select(installed):
    p, res = run(installed, mode="keep best K", k=1, selected=SelectableScript("Prompts from file or textbox",
                                                                              "scripts/prompts_from_file.py"))
    assert len(image_outputs(res)[0]) == 1 and not any("annotate" in c for c in p.comments)


def test_saved_files_and_returned_images_carry_their_own_record(installed):
    """Item 5: the ict_reward key of ict_core.metadata, one record per file, the image's own."""
    from ict_core import metadata
    p, res = run(installed, mode="keep best K", k=2, by="ict*hp")
    images, infos = image_outputs(res)
    for rank, (img, info, path) in enumerate(zip(images, infos, installed.webui.saved), 1):
        params = params_line(info)
        rec = metadata.own_scores(path)
        assert rec is not None and f"{rec['ict']:.4f}" == params["ICT score"]
        assert f"{rec['hp']:.4f}" == params["HP score"]
        assert (rec["by"], rec["rank"], rec["model"], rec["hp_model"]) == ("ict*hp", rank, "ict.safetensors",
                                                                           "hp.safetensors")
        assert rec["value"] == pytest.approx(rec["ict"] * rec["hp"]) and rec["index"] == int(params["Seed"]) - 1000
        assert rec["prompt"] == clean_prompt(info.splitlines()[0])
        assert metadata.loads(img.info["ict_reward"]) == [rec]
    assert "ict_reward" not in res.images[0].info            # the grid
    installed.webui.saved.clear()
    p, res = run(installed, mode="annotate")
    assert [metadata.own_scores(f)["rank"] for f in installed.webui.saved] == [None] * 4


def test_cuda_setting_without_a_gpu_names_the_setting_not_a_cli_flag(installed, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    installed.opts.data["ict_reward_device"] = "cuda"
    p, res = run(installed, mode="keep best K", k=1)
    msgs = [c for c in p.comments if "cuda" in c]
    assert msgs and "--device" not in msgs[0] and "Settings > ICT reward > Device" in msgs[0]
    assert res.all_seeds == [1000, 1001, 1002, 1003]


class _FakeModules:
    def __init__(self, scorer, moves):
        self.scorer, self.moves = scorer, moves

    def to(self, device):
        self.moves.append(str(device))
        self.scorer.device = torch.device(device)


def test_a1111_gives_the_gpu_back_after_scoring_unless_keep_loaded(monkeypatch):
    """A1111 has no memory manager: weights wait in RAM, go to the webui's device to score, and come back after
    (default); 'keep loaded' leaves them there."""
    from ict_webui.placement import TorchPlacement
    moves, loads = [], []
    sc = types.SimpleNamespace(device=torch.device("cpu"))
    sc.modules = _FakeModules(sc, moves)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: moves.append("empty"))
    h = ScorerHolder(lambda *a: loads.append(a) or sc, placement=TorchPlacement(lambda: "cuda"))
    assert h.get("ict", None, "auto", "auto") is sc and moves == ["cuda"]
    assert loads[0][2:] == (torch.device("cpu"), "auto", torch.device("cuda"))      # loaded in RAM, scored on cuda
    h.done_scoring(AFTER_CPU)
    assert moves == ["cuda", "cpu", "empty"] and sc.device.type == "cpu"
    h.get("ict", None, "auto", "auto")
    h.done_scoring(AFTER_KEEP)
    h.release(AFTER_KEEP)
    assert moves[-1] == "cuda" and sc.device.type == "cuda" and len(loads) == 1
    h.release(AFTER_CPU)
    assert sc.device.type == "cpu"
    assert TorchPlacement(lambda: "cpu").devices("auto") == (torch.device("cpu"), torch.device("cpu"))  # --use-cpu


def test_a1111_auto_device_is_the_webuis_device_for_the_task(installed):
    assert type(installed.module.REWARD.holder.placement).__name__ == "TorchPlacement"
    run(installed, mode="keep best K", k=1)
    assert installed.device_asks == ["ict_reward"]


def _fake_forge(monkeypatch, layout):
    calls = []
    mm = types.ModuleType("mm")
    mm.text_encoder_device = lambda: torch.device("cpu")
    mm.text_encoder_offload_device = lambda: torch.device("cpu")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda models, memory_required=0: calls.append(("load", list(models), memory_required))
    mm.unload_model_clones = lambda model: calls.append(("unload", model))
    mm.soft_empty_cache = lambda force=False: calls.append(("empty",))

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kw):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    if layout == "forge":
        names = {"backend": None, "backend.memory_management": mm, "backend.patcher": None,
                 "backend.patcher.base": None}
    else:
        names = {"ldm_patched": None, "ldm_patched.modules": None, "ldm_patched.modules.model_management": mm,
                 "ldm_patched.modules.model_patcher": None}
    for name in names:
        mod = names[name] or types.ModuleType(name)
        names[name] = mod
        monkeypatch.setitem(sys.modules, name, mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(names[parent], child, mod)
    list(names.values())[-1].ModelPatcher = ModelPatcher
    return calls


@pytest.mark.parametrize("layout", ["forge", "classic"])
def test_forge_places_the_models_through_its_memory_manager(request, monkeypatch, layout):
    """Forge main/Neo (backend.*) and Classic (ldm_patched.*): the models are wrapped in the host's ModelPatcher
    with its auxiliary-encoder devices and loaded with load_models_gpu(memory_required=...) before each scoring,
    as its own BLIP / DeepDanbooru / CLIP vision; 'unload' hands them back to the manager."""
    calls = _fake_forge(monkeypatch, layout)
    host = request.getfixturevalue("installed")
    holder = host.module.REWARD.holder
    assert type(holder.placement).__name__ == "ManagedPlacement"
    p, res = run(host, mode="keep best K", k=1, n_iter=2)
    loads = [c for c in calls if c[0] == "load"]
    assert len(loads) == 2 and len(image_outputs(res)[0]) == 2
    patcher = loads[0][1][0]
    assert patcher.model is holder._scorer.modules and loads[1][1][0] is patcher and loads[0][2] > 0
    assert patcher.load_device == torch.device("cpu") and not [c for c in calls if c[0] == "unload"]
    host.opts.data["ict_reward_after"] = AFTER_UNLOAD
    run(host, mode="annotate")
    assert [c[0] for c in calls][-4:] == ["load", "load", "unload", "empty"] and not holder.loaded
    assert calls[-2] == ("unload", patcher)          # the same model, reused by the third run, now handed back


def test_selected_script_lookup_is_tolerant():
    from ict_webui import other_scripts
    pm = SelectableScript("Prompt matrix")
    runner = types.SimpleNamespace(selectable_scripts=[SelectableScript("Loopback"), pm])
    assert other_scripts.positional_script(types.SimpleNamespace(scripts=runner, script_args=(2, True))) == \
        "Prompt matrix"
    for args in (None, (), ("junk",), (0,), (3,), (-1,), (1, True)):
        assert other_scripts.positional_script(types.SimpleNamespace(scripts=runner, script_args=args)) is None
    assert other_scripts.positional_script(types.SimpleNamespace()) is None


@pytest.fixture()
def neo_logging(request):
    """Forge Neo's modules/logging_config.py: the root logger at ERROR unless --loglevel is given."""
    import logging
    root, ours = logging.getLogger(), [logging.getLogger(n) for n in ("ict_reward", "ict_webui", "ict_core")]
    saved = (root.level, [lg.level for lg in ours])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root.setLevel(logging.ERROR)
    root.addHandler(handler)
    for lg in ours:
        lg.setLevel(logging.NOTSET)

    def restore():
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for lg, level in zip(ours, saved[1]):
            lg.setLevel(level)
    request.addfinalizer(restore)
    return records


def test_forge_neo_console_shows_the_engines_message(neo_logging, request, tiny_models):
    """Forge Neo's API info has no `comments` and its root logger drops warnings: the console is where an API user
    learns why nothing was scored (checked in a Neo build: before, a truncated ict.safetensors left no trace)."""
    host = request.getfixturevalue("host")
    host.models.mkdir(parents=True)
    data = Path(tiny_models.ict).read_bytes()
    (host.models / "ict.safetensors").write_bytes(data[:len(data) // 2])
    p, res = run(host, mode="keep best K", k=1)
    shown = [r.getMessage() for r in neo_logging if r.levelno >= 30]
    assert shown == [next(iter(p.comments))] and "is truncated" in shown[0] and len(image_outputs(res)[0]) == 4


def test_forge_neo_patcher_marking_its_device_does_not_hide_layers_left_behind():
    """Forge Neo's ModelPatcher sets `model.device` to the load device even when it left layers (plain torch
    layers, too big for the free VRAM) on the offload device: the scorer must still end up wholly on the device it
    runs on."""
    from ict_webui.placement import ManagedPlacement
    meta = torch.device("meta")             # stands for the GPU: the test machine has none
    modules = torch.nn.Module()
    modules.ict, modules.hp = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    sc = object.__new__(Scorer)
    sc.modules = modules

    def load_models_gpu(models, memory_required=0):
        for handle in models:
            handle.model.ict.to(meta)       # the part that fitted; hp stays behind
            handle.model.device = meta      # as Neo's ModelPatcher.load() does

    mm = types.SimpleNamespace(load_models_gpu=load_models_gpu)
    placement = ManagedPlacement(mm, lambda model, load_device, offload_device: types.SimpleNamespace(model=model),
                                 "Forge Neo")
    handle = placement.adopt(sc, meta, torch.device("cpu"))
    placement.to_run(sc, handle, meta)
    assert {t.device for t in modules.parameters()} == {meta}
