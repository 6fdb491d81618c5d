"""The cross-model atlas (sinkscope compare): rows read back from report.json files written by write_report,
against the profiles they came from; bad inputs are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TEXT_60

from sinkscope import analyze
from sinkscope.cli import main
from sinkscope.compare import atlas_rows, compare
from sinkscope.errors import ConfigError
from sinkscope.inputs import input_sensitivity
from sinkscope.report import write_report

K = 4


@pytest.fixture(scope="module")
def reports(tmp_path_factory, sink_llama, tiny_gemma3):
    root = tmp_path_factory.mktemp("atlas")
    profiles = {"sink": analyze(sink_llama, TEXT_60, k_max=K, progress=False),
                "gemma": analyze(tiny_gemma3, TEXT_60, k_max=K, progress=False)}
    profiles["sink"].inputs = input_sensitivity(sink_llama, TEXT_60, k_max=K, progress=False).to_dict()
    for name, p in profiles.items():
        write_report(p, root / name)
    return root, profiles


def test_rows_match_the_profiles(reports):
    root, profiles = reports
    entries = compare([root / "sink", root / "gemma" / "report.json"])  # a directory or the file itself
    rows = dict(atlas_rows(entries))
    for e, p in zip(entries, profiles.values(), strict=True):
        assert e.sink_rate == pytest.approx(p.sink_rate)
        assert e.recommended_sinks == p.recommendation.sinks and not e.validated
        np.testing.assert_allclose(e.layer_strength, p.first_token_mass.mean(axis=1), atol=1e-6)
        assert e.dormant_count == len(p.dormant_heads()) and e.window == p.deploy.window
        assert e.first_massive_layer == p.prompts[0].activations.first_massive_layer
    assert rows["sink rate"] == [f"{p.sink_rate:.1%}" for p in profiles.values()]
    strongest = int(np.argmax(profiles["gemma"].first_token_mass.mean(axis=1)))
    assert rows["strongest layer (mean first-token mass)"][1].startswith(f"layer {strongest} (")
    assert rows["BOS and chat template"][0].startswith("the input's form matters")
    assert rows["BOS and chat template"][1] == "not in this report"
    assert rows["learned-sink mass (mean)"] == ["no learned sinks"] * 2
    sink = profiles["sink"].first_token_mass > profiles["sink"].threshold
    assert entries[0].sink_margin == pytest.approx(profiles["sink"].geometry("sink_margin")[sink].mean(), abs=1e-5)
    assert rows["sink margin in sink heads (logits)"][0] == f"{entries[0].sink_margin:.2f}"
    assert rows["pinning secondary sinks"] == ["not in this report"] * 2  # report --pins sets it; analyze doesn't


def test_an_older_report_shows_what_it_lacks(reports, tmp_path):
    root, _ = reports
    doc = json.loads((root / "sink" / "report.json").read_text())
    for key in ("activations", "head_outputs", "inputs", "deploy", "key_geometry"):
        doc.pop(key)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(doc))
    rows = dict(atlas_rows(compare([tmp_path / "old", root / "gemma"])))
    for q in ("first massive activation", "dormant heads", "BOS and chat template",
              "sink margin in sink heads (logits)"):
        assert rows[q][0] == "not in this report"
    cache = rows["recommended cache"][0]
    assert cache.endswith("(attention estimate)") and "window" not in cache


def test_cli_writes_the_atlas(capsys, reports, tmp_path):
    root, _ = reports
    out = tmp_path / "atlas"
    rc = main(["compare", str(root / "sink"), str(root / "gemma"), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "sink rate" in stdout and "wrote html:" in stdout
    assert {p.name for p in out.iterdir()} == {"compare.html", "compare.md", "compare.json"}
    html = (out / "compare.html").read_text()
    assert 'id="fig-atlas-layers"' in html and 'href="../' in html  # links to each report, relative
    assert json.loads((out / "compare.json").read_text())["schema"] == "sinkscope.compare/1"
    assert "| sink rate |" in (out / "compare.md").read_text()


@pytest.mark.parametrize("case, needle", [
    ("one", "two or more report directories"),
    ("missing", "no report.json in"),
    ("not-json", "is not JSON"),
    ("foreign", "is not a sinkscope report"),
    ("twice", "the same report is given twice"),
])
def test_bad_input_is_one_line(capsys, reports, tmp_path, case, needle):
    root, _ = reports
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something.else/1"}))
    args = {"one": [root / "sink"], "missing": [root / "sink", tmp_path / "empty"],
            "not-json": [root / "sink", tmp_path / "bad.json"], "foreign": [root / "sink", tmp_path / "other.json"],
            "twice": [root / "sink", root / "sink" / "report.json"]}[case]
    with pytest.raises(ConfigError, match=needle):
        compare(args)
    rc = main(["compare", *map(str, args), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err
