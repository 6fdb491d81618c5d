"""Progress output (sinkscope._progress): whole lines when stderr is not a terminal, a bar when it is."""

from __future__ import annotations

import io

from conftest import TEXT_60

from sinkscope import _progress, analyze


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_off_a_terminal_a_bar_on_one_and_nothing_when_off(monkeypatch):
    out = io.StringIO()
    now = [0.0]
    monkeypatch.setattr(_progress.time, "monotonic", lambda: now[0])
    with _progress.progress(5, "analyzing m", "layer", stream=out) as bar:
        assert isinstance(bar, _progress.LineProgress)
        bar.set_postfix_str("prompt a")
        for t in (0.5, 1.0, 3.1, 3.2, 9.0):  # a line at 3.1 s (2 s after the last), none at the last step
            now[0] = t
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "analyzing m: 0/5 layers, 0 s started"
    assert lines[1].startswith("analyzing m: 3/5 layers, 3 s") and lines[1].endswith("[prompt a]")  # >= 2 s later
    assert lines[-1].startswith("analyzing m: 5/5 layers, 9 s") and lines[-1].endswith("done") and len(lines) == 3
    tty = _Tty()
    bar = _progress.progress(5, "x", "layer", stream=tty)
    assert type(bar).__module__.startswith("tqdm")
    bar.close()
    quiet = io.StringIO()
    with _progress.progress(5, "x", "layer", enabled=False, stream=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_analyze_writes_lines_to_a_log(tiny_llama, capsys):
    analyze(tiny_llama, TEXT_60, k_max=4, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith(f"analyzing {tiny_llama.spec.name}: 3/3 layers")
