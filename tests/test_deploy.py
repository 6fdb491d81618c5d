"""What to deploy (sinkscope.deploy): the recommendation as SinkCache / kvpress / llama.cpp settings. The
transformers snippet is run as written; the kvpress ratio is checked against kvpress's own keep rule."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import TEXT_60

from sinkscope import analyze
from sinkscope.analysis import Recommendation
from sinkscope.cli import main
from sinkscope.report import render_html, render_markdown

K = 4


@pytest.fixture(scope="module")
def profile(sink_llama):
    return analyze(sink_llama, TEXT_60, k_max=K, progress=False)


def test_settings_of_an_attention_estimate(profile, sink_llama):
    d = profile.deploy
    assert d.sinks == profile.recommendation.sinks == 1 and not d.validated
    assert d.window == 255 and "positions" in d.window_from  # the tiny model has 256 positions: S + W fits
    assert d.adds_bos and d.llama_cpp_keep == 0  # llama.cpp keeps the BOS token by itself
    snippets = d.snippets()
    assert set(snippets) == {"transformers", "kvpress", "llama.cpp", "per-head split"}
    assert "-c 256 --keep 0 --context-shift" in snippets["llama.cpp"]
    assert "n_sink=1" in snippets["kvpress"] and "keep = 256" in snippets["kvpress"]
    # The transformers snippet runs as written (a shorter generation).
    code = snippets["transformers"].replace("max_new_tokens=4096", "max_new_tokens=6")
    ids = sink_llama.tokenizer(TEXT_60, return_tensors="pt").input_ids
    scope = {"model": sink_llama.model, "input_ids": ids}
    with torch.no_grad():
        exec(code, scope)  # the snippet under test
    assert scope["out"].shape[1] == ids.shape[1] + 6
    assert scope["cache"].sinks == 1 and scope["cache"].window == 255
    assert json.dumps(profile.to_dict()["deploy"])


def test_kvpress_ratio_keeps_exactly_s_plus_w():
    """kvpress's StreamingLLMPress keeps int(n * (1 - ratio)) tokens: the snippet's ratio must give S + W for
    every context length (a plain 1 - keep / n loses a token to rounding for some n)."""
    from sinkscope.deploy import DeploySettings

    d = DeploySettings(model="org/model", sinks=4, window=252, validated=True, window_from="test", adds_bos=False)
    line = next(x for x in d.snippets()["kvpress"].splitlines() if x.startswith("ratio = "))
    expr = line.split("=", 1)[1].split("#")[0]
    for n in range(257, 20000, 7):
        ratio = eval(expr, {"max": max}, {"n_tokens": n, "keep": 256})  # the snippet under test
        assert int(n * (1 - ratio)) == 256, n
    assert 'model="org/model"' in d.snippets()["kvpress"] and d.llama_cpp_keep == 4  # no BOS: S as it is


def test_validated_recommendation_uses_its_window(profile):
    rec = Recommendation(2, "stream eval: ...", {"window": 64, "tolerance": 0.05,
                                                 "attention_estimate": profile.recommendation.to_dict(),
                                                 "cheapest_cache": {"sinks": 1, "window": 32}})
    validated = dataclasses.replace(profile, recommendation=rec)
    d = validated.deploy
    assert d.validated and (d.sinks, d.window) == (2, 64) and d.window_from.startswith("the window")
    assert any("S = 1, W = 32" in n for n in d.notes)
    assert "cache = SinkCache(model, sinks=2, window=64)" in d.snippets()["transformers"]


def test_a_model_sinkcache_refuses_gets_no_cache_snippet(profile):
    refused = dataclasses.replace(profile, cache_refused="gpt_oss: SinkCache can't serve this model: test")
    assert "transformers" not in refused.deploy.snippets()
    md = render_markdown(refused)
    assert "No SinkCache snippet: gpt\\_oss: SinkCache can't serve this model: test." in md
    assert "No SinkCache snippet" in render_html(refused)


def test_report_files_and_cli_line(capsys, llama_dir, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT_60)
    out = tmp_path / "r"
    rc = main(["report", str(llama_dir), "--prompt-file", str(prompt), "--k-max", str(K), "--no-validate",
               "--no-inputs", "--out", str(out), "--quiet"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads((out / "report.json").read_text())["deploy"]
    assert {"transformers", "kvpress", "llama.cpp"} <= set(doc["snippets"]) and doc["validated"] is False
    assert re.search(r"deploy: SinkCache\(model, sinks=\d+, window=\d+\); kvpress", stdout)
    md = (out / "report.md").read_text()
    assert "## What to deploy" in md and "```python" in md and "llama-cli" in md
    assert "<h2>What to deploy</h2>" in (out / "report.html").read_text()


def test_local_mass_against_loops_in_every_mode(tiny_gemma3, ref):
    """The mass on each query's last 8 keys from K on, per head: whole maps and statistics mode (torch and C row
    passes) against explicit loops over eager maps (Gemma-3: sliding layers too)."""
    import numpy as np

    from sinkscope import metrics

    ids = ref.encode(tiny_gemma3, TEXT_60)
    maps = ref.eager_attentions(tiny_gemma3.model, ids)
    t = ids.shape[1]
    want = np.array([[np.mean([a[hh, i, max(K, i - 7): i + 1].sum() for i in range(K, t)])
                      for hh in range(a.shape[0])] for a in maps])
    np.testing.assert_allclose(metrics.local_mass(torch.from_numpy(maps[0]), K), want[0], atol=1e-12)
    for mode in ("maps", "stats"):
        got = analyze(tiny_gemma3, TEXT_60, k_max=K, mode=mode, map_size=None, progress=False).local_mass
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_per_head_split(profile, tiny_llama):
    """The sink Llama parks on BOS in every head: all streaming; a random tiny Llama spreads its attention: all
    retrieval. A KV head is streaming only when all its query heads are."""
    import numpy as np

    d = profile.deploy
    assert d.kv_split == [[0, 0]] * 3 and d.streaming_heads == d.heads == 12
    assert "per-head split" in d.snippets() and "\t0\t0" in d.snippets()["per-head split"]
    spread = analyze(tiny_llama, TEXT_60, k_max=K, progress=False).deploy
    assert spread.kv_split == [[1, 1]] * 3 and spread.streaming_heads == 0
    # One query head of layer 1 below the bar: its KV head (heads 0-1 share KV head 0) turns retrieval.
    p = profile.prompts[0]
    low = p.local_mass.copy()
    low[1, 1] = -1.0
    mixed = dataclasses.replace(profile, prompts=[dataclasses.replace(p, local_mass=low)]).deploy
    assert mixed.kv_split == [[0, 0], [1, 0], [0, 0]] and mixed.streaming_heads == 11
    doc = mixed.to_dict()["per_head_split"]
    assert doc["kv_heads"] == mixed.kv_split and doc["layers"] == [0, 1, 2] and np.isclose(doc["streaming_share"], 0.9)
