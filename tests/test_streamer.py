"""The token streamer: NLLs against an independent forward, the live switch, drift flags, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TEXT_60

from sinkscope.cli import main
from sinkscope.errors import ConfigError
from sinkscope.streaming.streamer import DriftConfig, DriftDetector, Streamer


def reference_nll(lm, ids: list[int]) -> np.ndarray:
    """-log p(token t | tokens < t) for t >= 1 from one plain forward (no cache)."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return np.array([-float(logp[t - 1, ids[t]]) for t in range(1, len(ids))])


def ids_of(lm, text=TEXT_60) -> list[int]:
    return lm.tokenizer(text).input_ids


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_feed_nll_matches_plain_forward_without_eviction(tiny_llama, chunk):
    ids = ids_of(tiny_llama)
    s = Streamer(tiny_llama, sinks=4, window=100)  # budget beyond the text: nothing is evicted
    stats = list(s.feed(ids, chunk=chunk))
    assert [t.step for t in stats] == list(range(len(ids)))
    assert stats[0].nll is None and stats[0].entropy is None
    np.testing.assert_allclose([t.nll for t in stats[1:]], reference_nll(tiny_llama, ids), atol=2e-5)
    assert all(t.source == "prompt" for t in stats)
    assert "".join(t.text for t in stats[1:]) == TEXT_60  # first token is <bos>


def test_entropy_is_the_predictive_entropy(tiny_llama):
    ids = ids_of(tiny_llama)[:10]
    stats = list(Streamer(tiny_llama, sinks=2, window=50).feed(ids, chunk=1))
    with torch.no_grad():
        p = torch.softmax(tiny_llama.model(input_ids=torch.tensor([ids])).logits[0, 4].double(), -1)
    assert stats[5].entropy == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)


def test_greedy_generation_matches_argmax_chain(tiny_llama):
    ids = ids_of(tiny_llama, "The cat")
    s = Streamer(tiny_llama, sinks=2, window=64)
    list(s.feed(ids))
    got = [t.token_id for t in s.generate(12, stop_at_eos=False)]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(tiny_llama.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


def test_cache_stays_bounded_and_bytes_are_measured(tiny_llama):
    s = Streamer(tiny_llama, sinks=2, window=8)
    stats = list(s.feed(ids_of(tiny_llama), chunk=1))
    assert max(t.cache_length for t in stats) == 2 + 8 - 1
    assert stats[-1].cache_bytes == s.cache.nbytes() > 0
    assert stats[-1].cache_length == s.cache.cache_length
    assert all(t.latency_ms > 0 for t in stats)


def test_switch_takes_effect_at_the_next_token(tiny_llama):
    s = Streamer(tiny_llama, sinks=2, window=8)
    ids = ids_of(tiny_llama)
    seen = []
    for t in s.feed(ids, chunk=1):
        seen.append(t.sinks_enabled)
        if t.step == 19:
            s.set_sinks(False)
        if t.step == 39:
            s.set_sinks(True)
    assert seen[:20] == [True] * 20
    assert seen[20:40] == [False] * 20
    assert seen[40:] == [True] * (len(ids) - 40)
    assert s.sinks_enabled and s.cache.sinks_enabled


def test_sampling_is_seeded(tiny_llama):
    def run(seed):
        s = Streamer(tiny_llama, sinks=2, window=32)
        list(s.feed(ids_of(tiny_llama, "Hello")))
        return [t.token_id for t in s.generate(10, temperature=1.0, top_k=20, seed=seed, stop_at_eos=False)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bad_use(tiny_llama, tiny_gpt2):
    s = Streamer(tiny_llama, sinks=2, window=8)
    with pytest.raises(ConfigError, match="feed a prompt"):
        next(s.generate(3))
    with pytest.raises(ConfigError):
        Streamer(tiny_llama, sinks=-1, window=8)
    with pytest.raises(ConfigError):
        Streamer(tiny_gpt2, sinks=2, window=8)  # learned absolute positions: no re-assignment possible


# ------------------------------------------------------------------------------------------------- drift


def test_drift_detects_a_loop():
    d = DriftDetector(DriftConfig(loop_span=12, max_period=4))
    flags = [d.update(tok, None, None) for tok in [5, 6, 7, 8, 9, 1, 2, 3] + [1, 2, 3] * 5]
    assert not any(flags[:8])
    assert flags[-1] == ("loop: the last 12 tokens repeat every 3",)


def test_drift_detects_rising_loss_but_not_noise():
    rng = np.random.default_rng(0)
    cfg = DriftConfig(span=16, skip=4, nll_rise=1.0)
    calm = DriftDetector(cfg)
    calm_flags = [calm.update(i, 2.5 + rng.normal(0, 0.5), None) for i in range(200)]
    assert not any(calm_flags)
    rising = DriftDetector(cfg)
    flags = [rising.update(i, (2.5 if i < 100 else 4.5) + rng.normal(0, 0.5), None) for i in range(200)]
    assert not any(flags[:100])
    assert flags[-1] and flags[-1][0].startswith("nll ")


def test_drift_ignores_missing_and_nan_values():
    d = DriftDetector(DriftConfig(span=2, skip=0))
    assert d.update(1, None, math.nan) == ()


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_stream_prints_text_and_status(capsys, llama_dir, tmp_path):
    log = tmp_path / "tokens.jsonl"
    rc = main(["stream", str(llama_dir), "--prompt", "The cat sat", "--sinks", "2", "--window", "8",
               "--max-new-tokens", "30", "--no-eos", "--status-every", "10", "--sinks-off-at", "20",
               "--jsonl", str(log)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("The cat sat")  # special tokens are not printed
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 12 + 30  # <bos> + 11 characters, then 30 generated
    assert [r["sinks_enabled"] for r in rows][:20] == [True] * 20
    assert not any(r["sinks_enabled"] for r in rows[20:])
    assert max(r["cache_length"] for r in rows) == 9
    assert "[step 10 · cache" in err and "sinks OFF" in err and "tok/s" in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--sinks", "-1"], "--sinks"),
    (["--window", "0"], "--window"),
    (["--prompt", "   "], "empty"),
    (["--max-new-tokens", "-5"], "max-new-tokens"),
])
def test_cli_stream_bad_input(capsys, llama_dir, argv, needle):
    base = ["stream", str(llama_dir)]
    if "--prompt" not in argv:
        base += ["--prompt", "Hello"]
    rc = main([*base, *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().startswith("sinkscope: error:") and needle in err and "Traceback" not in err
