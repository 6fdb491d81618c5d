"""Input sensitivity (sinkscope.inputs): the same text with the BOS token toggled and in a chat template, each
variant's numbers checked against eager maps of exactly the token ids it describes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import BOS_ID, TEXT_60, build_llama, loaded

from sinkscope import inputs
from sinkscope.cli import main
from sinkscope.errors import ConfigError, PromptError
from sinkscope.prompts import Prompt
from sinkscope.report import render_html, render_markdown

K = 4
TEMPLATE = "{% for m in messages %}<bos>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _mean_first_token_mass(ref, model, ids: list[int]) -> float:
    import torch

    maps = ref.eager_attentions(model, torch.tensor([ids]))
    return float(np.mean([ref.first_token_mass(a, K) for a in maps]))


def test_without_bos_the_sink_goes(sink_llama, ref):
    """The sink Llama parks all attention on BOS: removed, the first-token mass collapses, and the verdict says
    that the input's form matters."""
    got = inputs.input_sensitivity(sink_llama, TEXT_60, k_max=K, progress=False)
    assert [v.name for v in got.variants] == [inputs.AS_TOKENIZED, inputs.WITHOUT_BOS]
    assert got.unavailable == {inputs.CHAT_TEMPLATE: "the tokenizer has no chat template"}
    default = sink_llama.tokenizer(TEXT_60).input_ids
    assert default[0] == BOS_ID
    for v, ids in zip(got.variants, (default, default[1:]), strict=True):
        assert v.n_tokens == len(ids)
        assert v.first_token_mass == pytest.approx(_mean_first_token_mass(ref, sink_llama.model, ids), abs=1e-6)
    base, without = got.variants
    assert base.first_tokens[0] == "<bos>" and without.first_tokens[0] == TEXT_60[0]
    assert base.sink_rate == 1.0 and base.first_token_mass > 0.9
    assert without.first_token_mass < 0.5 * base.first_token_mass
    assert got.verdict.startswith("the input's form matters") and "without BOS" in got.verdict
    doc = got.to_dict()
    assert doc["verdict"] == got.verdict and len(doc["variants"]) == 2 and json.dumps(doc)


def test_with_bos_and_a_chat_template(tok_nobos, ref):
    """A tokenizer that adds nothing gets a "with BOS" variant, and its chat template one more; each is measured on
    the ids it names (the template's text tokenized without special tokens added on top)."""
    tok = copy.deepcopy(tok_nobos)
    tok.chat_template = TEMPLATE
    lm = loaded(build_llama(seed=5), tok, "tiny-llama-chat")
    text = TEXT_60 * 3
    got = inputs.input_sensitivity(lm, text, k_max=K, max_tokens=100, progress=False)
    assert [v.name for v in got.variants] == [inputs.AS_TOKENIZED, inputs.WITH_BOS, inputs.CHAT_TEMPLATE]
    assert got.unavailable == {}
    cut = text[:100]  # one token per character: the first 100 tokens
    wrapped = tok(tok.apply_chat_template([{"role": "user", "content": cut}], tokenize=False),
                  add_special_tokens=False).input_ids
    expected = [tok(cut).input_ids, [BOS_ID, *tok(cut).input_ids], wrapped]
    assert wrapped[:6] == tok("<bos>[user", add_special_tokens=False).input_ids  # <bos> is one token
    for v, ids in zip(got.variants, expected, strict=True):
        assert v.n_tokens == len(ids)
        assert v.first_token_mass == pytest.approx(_mean_first_token_mass(ref, lm.model, ids), abs=1e-6)
        assert 0.0 <= v.sink_rate <= 1.0 and v.recommended_sinks >= 0


def test_a_tokenizer_without_bos_says_so(tok_nobos):
    tok = copy.deepcopy(tok_nobos)
    tok.bos_token = None
    lm = loaded(build_llama(seed=6), tok, "tiny-no-bos")
    got = inputs.input_sensitivity(lm, TEXT_60, k_max=K, progress=False)
    assert [v.name for v in got.variants] == [inputs.AS_TOKENIZED]
    assert got.unavailable["BOS"] == "the tokenizer defines no BOS token"
    assert got.verdict.startswith("only the tokenizer's default could be measured")


def test_bad_input(sink_llama):
    with pytest.raises(PromptError, match="needs at least K \\+ 1"):
        inputs.input_sensitivity(sink_llama, "abcd", k_max=K, progress=False)  # 5 with BOS, 4 without
    with pytest.raises(ConfigError, match="give it the prompt's text"):
        inputs.input_sensitivity(sink_llama, Prompt("p", "text", (1, 2, 3)), progress=False)
    with pytest.raises(ConfigError, match="max_tokens must be at least"):
        inputs.input_sensitivity(sink_llama, TEXT_60, k_max=K, max_tokens=3, progress=False)


def test_cli_inputs_and_the_report(capsys, llama_dir, tmp_path):
    rc = main(["inputs", str(llama_dir), "--prompt", TEXT_60, "--k-max", str(K), "--json", "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert [v["name"] for v in doc["variants"]] == [inputs.AS_TOKENIZED, inputs.WITHOUT_BOS]
    rc = main(["inputs", str(llama_dir), "--prompt", TEXT_60, "--k-max", str(K), "-q"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "without BOS" in out and "chat template: not measured" in out
    rc = main(["inputs", str(llama_dir), "--prompt", " ", "-q"])
    assert rc == 2 and "the prompt is empty" in capsys.readouterr().err

    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT_60)
    for flag, present in (("--inputs", True), ("--no-inputs", False)):
        out_dir = tmp_path / flag.strip("-")
        rc = main(["report", str(llama_dir), "--prompt-file", str(prompt), "--k-max", str(K), "--no-validate",
                   flag, "--out", str(out_dir), "--quiet"])
        stdout, err = capsys.readouterr()
        assert rc == 0, err
        report = json.loads((out_dir / "report.json").read_text())
        assert (report["inputs"] is not None) is present
        assert ("BOS and chat template" in (out_dir / "report.md").read_text()) is present
        assert ("BOS and chat template" in (out_dir / "report.html").read_text()) is present
        assert ("BOS and chat template: " in stdout) is present
    assert [v["name"] for v in json.loads((tmp_path / "inputs" / "report.json").read_text())["inputs"]["variants"]] \
        == [inputs.AS_TOKENIZED, inputs.WITHOUT_BOS]


def test_report_renders_the_variants(sink_llama):
    from sinkscope import analyze

    profile = analyze(sink_llama, TEXT_60, k_max=K, progress=False)
    profile.inputs = inputs.input_sensitivity(sink_llama, TEXT_60, k_max=K, progress=False).to_dict()
    md = render_markdown(profile)
    assert "## BOS and chat template" in md and "| without BOS |" in md and "The input's form matters" in md
    html = render_html(profile)
    assert "<h2>BOS and chat template</h2>" in html and "<code>&#x27;&lt;bos&gt;&#x27;</code>" in html
