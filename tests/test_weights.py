"""The converter's checks and refusals, and every run-time error on model files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import save_ict_layout, tiny_clip
from ict_core import Scorer
from ict_core.errors import InputError, ModelFileError
from ict_core.weights import convert, fingerprint, read_info
from tiny_config import TINY


def _bin(folder):
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def test_ict_file_contents(tiny_models):
    info = read_info(tiny_models.ict)
    assert info.kind == "ict"
    assert info.metadata["ict_reward.architecture"] and json.loads(info.metadata["ict_reward.architecture"])
    assert len(info.metadata["ict_reward.source_sha256"].split("=")[1]) == 64
    assert not any(k.endswith("position_ids") for k in info.tensors)
    assert info.tensors["text_projection.weight"][0] == "BF16"  # kept as released unless --dtype says otherwise


def test_hp_file_holds_only_what_hp_uses(tiny_models):
    info = read_info(tiny_models.hp)
    assert info.kind == "hp"
    assert not any(k.startswith("text_model.") or k == "text_projection.weight" or k == "logit_scale"
                   for k in info.tensors)
    assert {k.split(".")[0] for k in info.tensors} == {"vision_model", "visual_projection", "head"}
    assert "head.layers.7.weight" in info.tensors


def test_loaded_tensors_equal_the_source_and_no_random_init(tiny_models):
    state = torch.random.get_rng_state()
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp)
    assert torch.equal(state, torch.random.get_rng_state())  # nothing was randomly initialised
    src = _bin(tiny_models.ict_src)
    got = {k.replace(".parametrizations", "").replace(".original", ""): v
           for k, v in scorer.modules.ict.state_dict().items()}
    for k, v in got.items():
        if not k.endswith("position_ids"):
            assert torch.equal(v.float(), src[k].float()), k
    # the vision tower (the hot path) is materialised in fp32; the text tower stays bf16 as released
    assert scorer.modules.ict.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    assert got["text_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.bfloat16
    assert scorer.modules.ict.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32  # as used


def _variant(tiny_models, tmp_path, edit):
    folder = tmp_path / "ICT"
    folder.mkdir()
    sd = _bin(tiny_models.ict_src)
    edit(sd)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("edit,words", [
    (lambda sd: sd.pop("vision_model.post_layernorm.weight"), "missing 1: vision_model.post_layernorm.weight"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), "unexpected 1: extra.weight"),
    (lambda sd: sd.__setitem__("visual_projection.weight", torch.zeros(3, 3)), "wrong shape: visual_projection.weight"),
])
def test_converter_refuses_mismatched_checkpoints(tiny_models, tmp_path, edit, words):
    src = _variant(tiny_models, tmp_path, edit)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ModelFileError, match=words.replace(".", r"\.").replace("(", r"\(")):
        convert(src, out, tiny_models.config)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_converter_refuses_other_architecture(tiny_models, tmp_path):
    """Without --config the ViT-H shapes are expected: the tiny checkpoint is refused, naming tensors."""
    with pytest.raises(ModelFileError, match="wrong shape"):
        convert(tiny_models.ict_src, tmp_path / "x.safetensors")


def test_converter_layout_detection(tmp_path):
    with pytest.raises(InputError, match="neither an 8y/ICT folder"):
        convert(tmp_path, tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="not found"):
        convert(tmp_path / "nope", tmp_path / "x.safetensors")


def test_converter_uses_weights_only(tiny_models, tmp_path, monkeypatch):
    seen = {}
    real = torch.load
    monkeypatch.setattr(torch, "load",
                        lambda *a, **k: seen.setdefault("weights_only", k.get("weights_only")) and real(*a, **k))
    convert(tiny_models.ict_src, tmp_path / "x.safetensors", tiny_models.config)
    assert seen["weights_only"] is True


def test_converter_refuses_a_malicious_pickle(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "ICT").mkdir()
    with open(tmp_path / "ICT" / "pytorch_model.bin", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ModelFileError, match="cannot read"):
        convert(tmp_path / "ICT", tmp_path / "x.safetensors")


def test_convert_is_atomic_over_an_existing_file(tiny_models, tmp_path):
    out = tmp_path / "ict.safetensors"
    shutil.copy(tiny_models.ict, out)
    before = out.read_bytes()
    src = _variant(tiny_models, tmp_path, lambda sd: sd.pop("logit_scale"))
    with pytest.raises(ModelFileError):
        convert(src, out, tiny_models.config)
    assert out.read_bytes() == before


# ------------------------------------------------------------------------------------------ run-time refusals
def test_wrong_kind(tiny_models):
    with pytest.raises(ModelFileError, match="is an HP model but was given as the ICT model"):
        Scorer.load(tiny_models.hp)
    with pytest.raises(ModelFileError, match="is an ICT model but was given as the HP model"):
        Scorer.load(tiny_models.ict, tiny_models.ict)


def test_truncated_file(tiny_models, tmp_path):
    data = tiny_models.ict.read_bytes()
    for n in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"t{n}.safetensors"
        bad.write_bytes(data[:n])
        with pytest.raises(ModelFileError, match="truncated"):
            Scorer.load(bad)


def test_garbage_and_foreign_safetensors(tiny_models, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "g.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(ModelFileError, match="truncated or not a safetensors"):
        Scorer.load(bad)
    foreign = tmp_path / "f.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ModelFileError, match="not written by `ict convert`"):
        Scorer.load(foreign)


def test_pickle_at_run_time_is_refused(tiny_models):
    with pytest.raises(ModelFileError, match="never loaded at run time.*ict convert"):
        Scorer.load(tiny_models.ict_src / "pytorch_model.bin")


def test_other_architecture_at_load(tiny_models, tmp_path):
    other = json.loads(json.dumps(TINY))
    other["vision_config"]["num_hidden_layers"] = 3
    cfg = tmp_path / "other.json"
    cfg.write_text(json.dumps(other))
    with pytest.raises(ModelFileError, match="another architecture"):
        Scorer.load(tiny_models.ict, config=cfg)


def test_header_tampered_shapes(tiny_models, tmp_path):
    """A file whose tensors do not fit its own architecture record is refused before loading."""
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny_models.ict)
    sd.pop("logit_scale")
    with safe_open(str(tiny_models.ict), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "b.safetensors"
    save_file(sd, bad, metadata=meta)
    with pytest.raises(ModelFileError, match="missing 1: logit_scale"):
        Scorer.load(bad)


def test_fingerprint_is_cheap_and_tells_files_apart(tiny_models, tmp_path):
    a = fingerprint(tiny_models.ict)
    assert a == fingerprint(tiny_models.ict)
    copy = tmp_path / "copy.safetensors"
    shutil.copy(tiny_models.ict, copy)
    assert fingerprint(copy) == a  # same bytes, same identity, wherever the file lives
    assert fingerprint(tiny_models.hp) != a
    other = convert(save_ict_layout(tiny_clip(9), tmp_path / "ICT9"), tmp_path / "ict9.safetensors",
                    tiny_models.config).path
    assert fingerprint(other) != a


def test_half_precision_waits_on_the_cpu_for_a_gpu_host(tiny_models):
    """A host that scores on the GPU keeps the weights on the CPU in the GPU's precision (ComfyUI)."""
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu", run_device=torch.device("cuda"),
                         precision="fp16")
    assert scorer.dtype == torch.float16 and scorer.device.type == "cpu"
    assert next(scorer.modules.ict.parameters()).dtype == torch.float16
    assert scorer.modules.hp.head.layers[0].weight.dtype == torch.float32  # the head stays fp32
    assert Scorer.load(tiny_models.ict, precision="fp16").dtype == torch.float32  # CPU-only: fp32, with a warning


def test_out_of_memory_chunk_is_split_and_retried(tiny_models, images, monkeypatch):
    """On CUDA a chunk that runs out of memory is halved (for the rest of the run too) with the same scores."""
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp, chunk_size=8)
    want = scorer.score(images[:6], "a fox")
    real = scorer._forward_images
    sizes = []

    def flaky(batch, *args):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, *args)

    monkeypatch.setattr(scorer, "_forward_images", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = scorer.score(images[:6], "a fox")
    assert [r.ict for r in got] == pytest.approx([r.ict for r in want], abs=1e-6)
    assert sizes[0] == 6 and max(sizes[1:]) <= 3 and scorer.chunk_size <= 2


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_only_when_it_runs_natively(tiny_models, images, monkeypatch, caplog, native):
    """bf16 is opt-in lower precision; on a CPU it is honoured only with native bf16 (AVX512-BF16/AMX),
    where it is 2-3x faster; elsewhere emulated bf16 would be slower than fp32, so fp32 it is."""
    import ict_core.scorer as scorer_mod

    monkeypatch.setattr(scorer_mod, "cpu_runs_bf16", lambda: native)
    fp32 = [r.ict for r in Scorer.load(tiny_models.ict, tiny_models.hp).score(images[:4], "a fox")]
    with caplog.at_level("WARNING", logger="ict_core.scorer"):
        scorer = Scorer.load(tiny_models.ict, tiny_models.hp, precision="bf16")
    assert scorer.dtype == (torch.bfloat16 if native else torch.float32)
    assert bool(caplog.records) is not native and all("\n" not in r.getMessage() for r in caplog.records)
    got = [r.ict for r in scorer.score(images[:4], "a fox")]
    assert got == pytest.approx(fp32, abs=1e-2)  # cosines in [-1, 1]; bf16 keeps ~3 digits
    assert (got != fp32) is native  # bf16 really ran (and fp32 gives the fp32 scores exactly)
