"""The support matrix: every family in tests/families.py, every sinkscope mode, exact or refused, never off.

Each row runs :func:`sinkscope.checks.check_model`, which holds every mode to transformers' own computation
(eager ``output_attentions`` maps and logits, metrics of those maps in numpy, fresh forwards without a cache
over the tokens a SinkCache keeps). Here we pin what each family is expected to get, so a regression in
either direction (a family silently refused, or a refusal lifted without exactness) fails; ``docs/models.md``
must show the same table (it is written by ``docs/models_table.py`` from these rows).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from families import FAMILIES, build, token_ids

from sinkscope import analysis
from sinkscope.checks import CHECKS, EXACT, REFUSED, SKIPPED, check_model
from sinkscope.errors import CaptureError, ConfigError
from sinkscope.scheme import attention_scheme

DOCS = Path(__file__).resolve().parent.parent / "docs" / "models.md"
CACHE = {"cache", "streamer", "onepass"}  # one pass serves what SinkCache serves, through the attention interface
# family -> the checks it is refused in (everything else must be exact).
REFUSED_CHECKS: dict[str, set[str]] = {
    "gptj": {"stats", "onepass"},  # own attention code, no attention interface (eval-stream: token by token)
    "falcon": {"stats", "onepass"},
    "falcon_alibi": {"stats", "onepass"},
    "mpt": {"stats", "onepass"},
    "bloom": {"stats", "onepass"},
    "gpt2": CACHE,  # absolute positions
    "opt": CACHE,
    "gemma3n": CACHE,  # KV sharing
    "deepseek_v3": CACHE,  # MLA
    "llama4": CACHE,  # chunked attention, position-scaled queries
}
# family -> checks that can't use the generic reference (test_streaming_cache has a hybrid reference).
SKIPPED_CHECKS: dict[str, set[str]] = {"qwen3_next": {"cache", "streamer"}}
# Falcon can't switch to eager after loading; sinkscope.load_model loads it eager, so the matrix does too.
ATTN = {"falcon": "eager", "falcon_alibi": "eager"}


def expected(name: str) -> dict[str, str]:
    refused, skipped = REFUSED_CHECKS.get(name, set()), SKIPPED_CHECKS.get(name, set())
    return {c: REFUSED if c in refused else SKIPPED if c in skipped else EXACT for c in CHECKS}


@pytest.fixture(scope="module")
def rows():
    return {}


def row_of(rows: dict, name: str):
    if name not in rows:
        rows[name] = check_model(build(name, attn=ATTN.get(name)))
    return rows[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_exact_or_refused(name, rows):
    row = row_of(rows, name)
    got = {c: r.status for c, r in row.results.items()}
    details = {c: r.detail for c, r in row.results.items() if r.status != EXACT}
    assert got == expected(name), details
    for check, r in row.results.items():
        if r.status == REFUSED:  # one line that names the family and what works instead
            assert "\n" not in r.detail and row.family in r.detail and ";" in r.detail, (check, r.detail)
        elif r.status == EXACT:
            assert r.max_error is not None and r.max_error <= 1e-4, (check, r)


def test_learned_sinks_are_measured_not_zero(rows):
    row = row_of(rows, "gpt_oss")
    assert row.scheme.learned_sinks
    assert "learned sinks" in row.summary()


def test_falcon_loaded_with_sdpa_is_refused_before_any_work():
    model = build("falcon")  # sdpa: transformers ignores set_attn_implementation("eager") on Falcon
    assert model.config._attn_implementation == "sdpa"
    import sinkscope

    with pytest.raises(CaptureError, match="attn_implementation='eager'"), sinkscope.capture(model):
        pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["mpt", "gptj"])
def test_auto_mode_falls_back_to_maps_and_says_why(name, monkeypatch, tok_nobos):
    from conftest import loaded

    lm = loaded(build(name), tok_nobos, name)
    monkeypatch.setattr(analysis, "STATS_FROM_TOKENS", 16)
    prof = analysis.analyze(lm, "The cat sat on the mat. " * 2, map_size=None, progress=False)
    assert [p.capture for p in prof.prompts] == ["maps"]
    assert "attention interface" in prof.settings["stats_fallback"]
    with pytest.raises(ConfigError, match=f"{name}: statistics mode .* use whole maps"):
        analysis.analyze(lm, "The cat sat on the mat. " * 2, mode="stats", progress=False)


def test_hybrid_model_captures_its_attention_layers_only(tok_nobos):
    from conftest import loaded

    import sinkscope

    lm = loaded(build("qwen3_next"), tok_nobos, "qwen3_next")
    assert attention_scheme(lm.model).attention_layers == [1]
    prof = analysis.analyze(lm, "The cat sat on the mat. " * 2, map_size=None, progress=False)
    assert prof.layers == [1]
    with pytest.raises(CaptureError, match="no softmax attention"), sinkscope.capture(lm.model, layers=[0]):
        pass


def test_layer_count_check_catches_a_layer_that_slipped_past(monkeypatch):
    """A module that bypasses the registered function (here: one layer forced back to SDPA) is caught."""
    import importlib

    import sinkscope

    capture_mod = importlib.import_module("sinkscope.capture")  # the module, not sinkscope.capture()
    model = build("llama")
    real = capture_mod._stats_attention
    skipped = model.model.layers[1].self_attn

    def leaky(module, *args, **kwargs):
        if module is skipped:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, *args, **kwargs)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(capture_mod, "_stats_attention", leaky)
    from transformers import AttentionInterface

    AttentionInterface.register(capture_mod.STATS_IMPLEMENTATION, leaky)
    try:
        with (pytest.raises(CaptureError, match=r"layers \[1\] never reached"),
              sinkscope.capture_stats(model) as cap, torch.no_grad()):
            model(input_ids=token_ids(20), use_cache=False)
        assert set(cap.stats) == {0}
    finally:
        AttentionInterface.register(capture_mod.STATS_IMPLEMENTATION, real)


def test_docs_models_md_matches_the_matrix(rows):
    """docs/models.md's status cells are the matrix's (regenerate with: python docs/models_table.py)."""
    text = DOCS.read_text()
    for name in sorted(FAMILIES):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{name}` |")), None)
        assert line is not None, f"docs/models.md has no row for {name}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        statuses = [re.sub(r"[^a-z]", "", c.split()[0]) if c else "" for c in cells[2:2 + len(CHECKS)]]
        want = expected(name)
        assert statuses == [want[c] for c in CHECKS], (name, line)
