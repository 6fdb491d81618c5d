"""Prompts: named texts read from files or given inline, validated before any model work starts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError

_MAX_PROMPT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Prompt:
    """A named text to analyze; ``ids``, when given, are its tokens as they should reach the model (the text is
    then what is shown): a BOS added or removed, a chat template applied (:mod:`sinkscope.inputs`)."""

    name: str
    text: str
    ids: tuple[int, ...] | None = None


def sample_prompts_dir() -> Path:
    """The ``sample_prompts/`` folder of the checkout (``$SINKSCOPE_PROMPTS`` overrides it)."""
    env = os.environ.get("SINKSCOPE_PROMPTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "sample_prompts"


def read_prompt_file(path: str | Path) -> Prompt:
    """Read one prompt file, refusing what can't be a prompt: missing, empty, binary or non-UTF-8 files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PromptError(f"prompt file {p} does not exist")
    if p.is_dir():
        raise PromptError(f"{p} is a directory; pass its files, or use sample_prompts/ by giving no --prompt-file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PromptError(f"can't read prompt file {p}: {exc.strerror}") from exc
    if len(data) > _MAX_PROMPT_BYTES:
        raise PromptError(f"prompt file {p} is larger than 16 MiB; pass a smaller text (or --max-tokens)")
    if b"\x00" in data:
        raise PromptError(f"prompt file {p} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file {p} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from exc
    if not text.strip():
        raise PromptError(f"prompt file {p} is empty")
    return Prompt(name=p.stem, text=text)


LONG_TEXT_NAME = "pydoc_data.topics"


def long_text() -> Prompt:
    """Python's own documentation topics (``pydoc_data.topics``: standard library, offline, human-written
    English, ~600k tokens), in key order: the long text of stream evaluation and of ``report --long-prompt``."""
    from pydoc_data.topics import topics

    return Prompt(LONG_TEXT_NAME, "\n\n".join(topics[k] for k in sorted(topics)))


def sample_prompts() -> list[Prompt]:
    """The prompts in ``sample_prompts/``, sorted by file name."""
    d = sample_prompts_dir()
    files = sorted(d.glob("*.txt")) if d.is_dir() else []
    if not files:
        raise PromptError(f"no sample prompts found in {d}; pass --prompt-file FILE")
    return [read_prompt_file(f) for f in files]


def as_prompts(prompts: str | Prompt | Sequence[str | Prompt] | Iterable[str | Prompt]) -> list[Prompt]:
    """Normalise what ``analyze`` accepts (a text, a Prompt, or a list of either) to a list of Prompts."""
    items = [prompts] if isinstance(prompts, (str, Prompt)) else list(prompts)
    if not items:
        raise PromptError("no prompts given")
    out: list[Prompt] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        p = item if isinstance(item, Prompt) else Prompt(name=f"prompt-{i + 1}", text=str(item))
        if not p.text.strip():
            raise PromptError(f"prompt {p.name!r} is empty")
        name, n = p.name, 2
        while name in names:  # two files called notes.txt in different folders must not collide
            name, n = f"{p.name}-{n}", n + 1
        names.add(name)
        out.append(Prompt(name, p.text, p.ids))
    return out
