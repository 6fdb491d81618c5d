"""sinkscope.prompts: reading and validating prompt files, sample prompts, normalising inputs."""

from __future__ import annotations

import pytest

from sinkscope.errors import PromptError, SinkscopeError
from sinkscope.prompts import Prompt, as_prompts, read_prompt_file, sample_prompts, sample_prompts_dir

SAMPLE_NAMES = ["code", "dialogue", "list", "long-document", "poem", "prose", "repetitive", "technical"]


def test_reads_a_utf8_file(tmp_path):
    f = tmp_path / "hello.txt"
    f.write_text("Grüße, 世界\nsecond line\n", encoding="utf-8")
    p = read_prompt_file(f)
    assert p == Prompt("hello", "Grüße, 世界\nsecond line\n")


def test_accepts_str_path_and_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.txt").write_text("some text")
    assert read_prompt_file("~/x.txt") == Prompt("x", "some text")
    assert read_prompt_file(str(tmp_path / "x.txt")).text == "some text"


def test_utf8_bom_is_accepted_and_stripped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfHello there")
    assert read_prompt_file(f).text == "Hello there"


def test_missing_file(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


def test_directory(tmp_path):
    with pytest.raises(PromptError, match="is a directory"):
        read_prompt_file(tmp_path)


@pytest.mark.parametrize("content", [b"", b"   ", b"\n\n\t \r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf  \n"])
def test_empty_or_whitespace(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(PromptError, match="is empty"):
        read_prompt_file(f)


def test_binary_with_nul_bytes(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"text\x00more text")
    with pytest.raises(PromptError, match="looks binary"):
        read_prompt_file(f)


def test_utf16_is_refused_as_binary(tmp_path):
    f = tmp_path / "u16.txt"
    f.write_text("hello", encoding="utf-16")
    with pytest.raises(PromptError):
        read_prompt_file(f)


@pytest.mark.parametrize(("content", "byte"), [(b"\xff\xfe\xfa", 0), (b"ok \xc3\x28", 3), (b"caf\xe9", 3)])
def test_not_utf8(tmp_path, content, byte):
    f = tmp_path / "latin.txt"
    f.write_bytes(content)
    with pytest.raises(PromptError, match=rf"not valid UTF-8 \(byte {byte}\)"):
        read_prompt_file(f)


def test_too_large(tmp_path):
    f = tmp_path / "big.txt"
    with open(f, "wb") as fh:
        fh.truncate(16 * 1024 * 1024 + 1)  # sparse: costs no disk
    with pytest.raises(PromptError, match="larger than 16 MiB"):
        read_prompt_file(f)


def test_errors_are_sinkscope_errors_with_one_line_messages(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"\xff")
    with pytest.raises(SinkscopeError) as info:
        read_prompt_file(f)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------- sample prompts


def test_sample_prompts_in_the_repo(monkeypatch):
    monkeypatch.delenv("SINKSCOPE_PROMPTS", raising=False)
    prompts = sample_prompts()
    assert [p.name for p in prompts] == SAMPLE_NAMES
    assert all(len(p.text) > 500 for p in prompts)
    assert sample_prompts_dir().name == "sample_prompts"
    assert (sample_prompts_dir() / "SOURCES.md").is_file()  # documented, but not a prompt


def test_sample_prompts_env_override(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "notes.md").write_text("not a prompt")
    monkeypatch.setenv("SINKSCOPE_PROMPTS", str(tmp_path))
    assert sample_prompts() == [Prompt("a", "ay"), Prompt("b", "bee")]


def test_sample_prompts_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_PROMPTS", str(tmp_path / "nowhere"))
    with pytest.raises(PromptError, match="no sample prompts found"):
        sample_prompts()
    monkeypatch.setenv("SINKSCOPE_PROMPTS", str(tmp_path))
    with pytest.raises(PromptError, match="no sample prompts found"):
        sample_prompts()


def test_sample_prompts_with_a_bad_file(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"\x00\x01")
    monkeypatch.setenv("SINKSCOPE_PROMPTS", str(tmp_path))
    with pytest.raises(PromptError, match="looks binary"):
        sample_prompts()


# ------------------------------------------------------------------------------------------ as_prompts


def test_as_prompts_single_text():
    assert as_prompts("hello") == [Prompt("prompt-1", "hello")]


def test_as_prompts_single_prompt():
    assert as_prompts(Prompt("mine", "text")) == [Prompt("mine", "text")]


def test_as_prompts_mixed_list_and_generator():
    items = ["one", Prompt("named", "two"), "three"]
    expected = [Prompt("prompt-1", "one"), Prompt("named", "two"), Prompt("prompt-3", "three")]
    assert as_prompts(items) == expected
    assert as_prompts(x for x in items) == expected
    assert as_prompts(("one",)) == [Prompt("prompt-1", "one")]


def test_as_prompts_deduplicates_names():
    out = as_prompts([Prompt("notes", "a"), Prompt("notes", "b"), Prompt("notes-2", "c"), Prompt("notes", "d")])
    assert [p.name for p in out] == ["notes", "notes-2", "notes-2-2", "notes-3"]
    assert [p.text for p in out] == ["a", "b", "c", "d"]
    assert len({p.name for p in out}) == 4


def test_as_prompts_keeps_text_untouched():
    assert as_prompts("  padded\n")[0].text == "  padded\n"


@pytest.mark.parametrize("bad", [[], (), "", "  \n\t", [Prompt("x", "ok"), Prompt("y", " ")], ["fine", ""]])
def test_as_prompts_empty(bad):
    with pytest.raises(PromptError, match=r"empty|no prompts"):
        as_prompts(bad)
