"""Pinning secondary sinks (sinkscope.pins): perplexities against a stream managed by hand, the verdict, the
refusals, and ``report --pins`` end to end on a model with a planted second sink."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TEXT_60, build_gpt2, build_llama, loaded, pinned_stream_reference

from sinkscope import analyze
from sinkscope.cli import main
from sinkscope.errors import ConfigError, PromptError
from sinkscope.pins import MIN_SCORED, PIN_TOLERANCE, pin_evidence, profile_pin_evidence
from sinkscope.report import render_markdown


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models gain nothing from threads (conftest.one_torch_thread)."""


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_perplexities_equal_streams_managed_by_hand(tok_nobos):
    model = build_llama(seed=4)
    lm = loaded(model, tok_nobos, "llama")
    x = _ids(90, seed=7)
    ev = pin_evidence(lm, x, [9, 5, 0], sinks=1, window=20, tokens=["a", "b", "c"])
    assert ev.positions == [5, 9] and ev.tokens == ["b", "a"]  # position 0 is a sink already; sorted
    assert ev.scored_from == 9 + 20 + 1 and ev.n_tokens == 90

    def ppl(nll):
        return math.exp(float(np.mean(nll[ev.scored_from:])))

    assert ev.baseline_ppl == pytest.approx(ppl(pinned_stream_reference(model, x, 1, 20, set())), rel=1e-5)
    assert ev.leading_ppl == pytest.approx(ppl(pinned_stream_reference(model, x, 3, 20, set())), rel=1e-5)
    assert ev.pinned_ppl == pytest.approx(ppl(pinned_stream_reference(model, x, 1, 20, {5, 9})), rel=1e-5)
    rel = (ev.leading_ppl - ev.pinned_ppl) / ev.leading_ppl
    assert ev.helps == (rel > PIN_TOLERANCE)
    assert ("beats 2 more leading tokens" in ev.verdict) == ev.helps and "the 2 secondary sinks" in ev.verdict
    assert json.loads(json.dumps(ev.to_dict()))["positions"] == [5, 9]


def test_the_default_window_leaves_tokens_to_score_and_refusals_are_one_line(tok_nobos):
    lm = loaded(build_llama(seed=4), tok_nobos, "llama")
    x = _ids(80, seed=8)
    ev = pin_evidence(lm, x, [30], sinks=2)
    assert ev.n_tokens - ev.scored_from >= MIN_SCORED and ev.window == 80 - MIN_SCORED - 30 - 1
    with pytest.raises(PromptError, match="nothing to pin") as e:
        pin_evidence(lm, x, [0, 1], sinks=2)
    with pytest.raises(PromptError, match="too few for the pin at position 60") as e:
        pin_evidence(lm, x, [60], sinks=2)
    assert "\n" not in str(e.value)
    with pytest.raises(PromptError, match="too few"):
        pin_evidence(lm, x, [10], sinks=2, window=60)
    with pytest.raises(ConfigError, match="sinks must be a whole number"):
        pin_evidence(lm, x, [10], sinks=-1)
    gpt2 = loaded(build_gpt2(), tok_nobos, "gpt2")
    with pytest.raises(ConfigError) as e:
        pin_evidence(gpt2, x, [10], sinks=2, window=20)
    assert "\n" not in str(e.value)


def test_a_planted_second_sink_is_pinned_from_the_profile(colon_sink_llama):
    lm = colon_sink_llama
    text = TEXT_60 * 3
    profile = analyze(lm, text, k_max=4, map_size=None, progress=False)
    colon = TEXT_60.index(":") + 1  # after the BOS token
    assert profile.prompts[0].secondary_sinks[0].position == colon
    from sinkscope.prompts import Prompt

    ev = profile_pin_evidence(lm, profile, [Prompt("prompt", text)], max_pins=1)
    assert ev.positions == [colon] and ev.tokens == [":"] and ev.sinks == profile.recommendation.sinks
    profile.pinning = ev.to_dict()
    md = render_markdown(profile)
    assert f"Pinned on {ev.prompt} (positions {colon} (':'); S = {ev.sinks}, W = {ev.window}" in md
    assert ev.verdict[1:] in md and ("the secondary sink" in ev.verdict) and "one more leading token" in ev.verdict


def test_report_pins_by_default(tmp_path, capsys, colon_sink_llama, monkeypatch):
    from sinkscope import cli

    monkeypatch.setattr(cli, "_load", lambda source, args, progress=True: colon_sink_llama)
    text = tmp_path / "p.txt"
    text.write_text(TEXT_60 * 3)
    args = ["report", "test:colon", "--prompt-file", str(text), "--no-validate", "--no-inputs", "-q", "--k-max", "4"]
    rc = main([*args, "--out", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    pin = json.loads((tmp_path / "a" / "report.json").read_text())["pinning"]
    assert pin["positions"][0] == TEXT_60.index(":") + 1 and f"secondary sinks: {pin['verdict']}" in out
    rc = main([*args, "--no-pins", "--out", str(tmp_path / "b")])
    assert rc == 0 and json.loads((tmp_path / "b" / "report.json").read_text())["pinning"] is None
