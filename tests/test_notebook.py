"""docs/notebook.ipynb, run as users run it: every cell in a Jupyter kernel (nbclient + ipykernel), on the real
SmolLM2. What its prose claims (one sink brings the perplexity back, the switch drops the sinks from the cache
and the loss rises) is checked on the outputs, so the notebook can't drift from the library."""

from __future__ import annotations

import ast
import os
import re

import pytest
from conftest import REPO_ROOT, require_distribution

pytestmark = pytest.mark.real

NOTEBOOK = REPO_ROOT / "docs" / "notebook.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"


def _text(cell) -> str:
    """A code cell's printed and displayed text (stdout and text/plain)."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def _cell(nb, source_start: str):
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start))


@pytest.fixture(scope="module")
def executed():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from sinkscope import models

    require_distribution(models.REGISTRY["smollm2-135m"].distribution, models.REGISTRY["smollm2-135m"].install)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"SINKSCOPE_CACHE": os.environ.get("SINKSCOPE_CACHE") or str(REPO_ROOT / ".cache" / "sinkscope-test"),
           "JUPYTER_PLATFORM_DIRS": "1"}  # (the kernel inherits the environment; the second quiets a warning)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        # The kernel of this interpreter (ipykernel's own spec), started in the repo root as a user would.
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO_ROOT)}})
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return nb


def test_every_cell_runs_and_the_figures_are_plotly(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.outputs or "=" in c.source.splitlines()[-1] for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    figures = [c for c in code if c.source.rstrip().endswith(")") and "plot" in c.source.splitlines()[-1]]
    assert len(figures) == 6  # heatmap, sink mass, attention map, perplexity, stream, long sink mass
    for c in figures:
        assert any(PLOTLY in o.get("data", {}) for o in c.outputs), c.source


def test_the_summary_and_recommendation_are_shown(executed):
    summary = _cell(executed, "profile = sinkscope.analyze")
    html = next(o.data["text/html"] for o in summary.outputs if "text/html" in o.get("data", {}))
    assert "smollm2-135m" in html and "sink" in html.lower()
    rec = _text(_cell(executed, "rec = profile.recommendation"))
    assert re.match(r"keep \d+ sink token\(s\): attention", rec) and "first-token mass above" in rec
    table = _text(_cell(executed, "profile.to_dataframe()"))
    assert "layer" in table and "head" in table


def test_what_the_prose_says_holds(executed):
    line = _text(_cell(executed, "text = samples")).splitlines()[0]
    ppl = ast.literal_eval(line.split(" dense ")[0])
    dense = float(line.split(" dense ")[1])
    assert ppl[0] > 1.5 * ppl[1] and ppl[1] < 1.25 * dense  # "doubles", "back near dense"

    m = re.search(r"cache (\d+) -> (\d+) tokens; mean NLL ([\d.]+) with sinks, ([\d.]+) without",
                  _text(_cell(executed, "ids = lm.tokenizer")))
    assert m, _text(_cell(executed, "ids = lm.tokenizer"))
    assert (int(m[1]), int(m[2])) == (4 + 64 - 1, 64 - 1)  # S + W - 1, then the sinks dropped
    assert float(m[4]) > float(m[3])

    assert re.match(r"2048 tokens in stats mode", _text(_cell(executed, "long = sinkscope.analyze")))
