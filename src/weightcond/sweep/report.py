"""The report of a sweep: statistics over seeds, a ranking, tables, a CSV and plots.

:func:`~weightcond.sweep.summarize` turns trial records into the results (what
``results.json`` holds), a pure function of the records;
:func:`~weightcond.sweep.format_report` prints them as text or Markdown;
:func:`~weightcond.sweep.write_report` writes ``results.json``, ``results.csv`` and the
plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OptionError
from .stats import Interval, Paired, holm, mean_interval, paired_test

__all__ = ["COLUMNS", "format_report", "results", "summarize", "write_report"]

#: The placement-side columns of a heat map, in the order of DESIGN's W' formula.
COLUMNS = ("pre_left", "pre_right", "post_left", "post_right")


def _interval(i: Interval) -> dict[str, Any]:
    return {"n": i.n, "mean": i.mean, "low": i.low, "high": i.high, "sd": i.sd}


def _paired(p: Paired | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"seeds": list(p.seeds), "difference": _interval(p.difference), "t": p.t, "p": p.p,
            "resolved": p.resolved}


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(known) if known else None


def summarize(records: Sequence[dict[str, Any]], *, baseline: str = "lora",
              level: float = 0.95) -> dict[str, Any]:
    """Statistics of trial records (each with ``variant``, ``seed``, ``recipe``,
    ``accuracy``, ``step_time_s``, ``peak_bytes``, ``trainable``, ``entropy``).

    Returns:
        ``variants``: per variant, ranked by mean accuracy (best first): its recipe, seeds,
        the mean accuracy and its ``level`` interval over seeds (Student t), medians over
        seeds of ``step_time_s``, ``peak_bytes``, ``trainable`` and ``entropy``, and
        ``vs_baseline``: the paired comparison with ``baseline`` over their common seeds
        (mean difference, interval, t, p, Holm-adjusted ``p_holm`` over the family of
        comparisons with the baseline, ``resolved``: the interval excludes 0);
        ``ranking``: the paired comparison of each variant with the next one down;
        ``comparisons``: every pair, the higher-ranked first; ``grid``: the heat map's
        cells (transform × placement-side) when every variant is the update with one
        conditioner or a baseline without one, else ``None``.
    """
    if not 0.0 < level < 1.0:
        raise OptionError(f"summarize: argument 'level' expected a number in (0, 1), got "
                          f"{level!r}")
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    accuracy = {name: {s: r["accuracy"] for s, r in runs.items()}
                for name, runs in by_variant.items()}
    rows = []
    for name, runs in by_variant.items():
        first = runs[min(runs)]
        rows.append({
            "name": name, "recipe": first["recipe"], "seeds": sorted(runs),
            "accuracy": _interval(mean_interval([runs[s]["accuracy"] for s in sorted(runs)],
                                                level=level)),
            "step_time_s": _median([r["step_time_s"] for r in runs.values()]),
            "peak_bytes": _median([r["peak_bytes"] for r in runs.values()]),
            "trainable": _median([r["trainable"] for r in runs.values()]),
            "entropy": _median([r.get("entropy") for r in runs.values()]),
        })
    rows.sort(key=lambda r: -r["accuracy"]["mean"])
    has_baseline = baseline in by_variant
    for row in rows:
        row["vs_baseline"] = (None if not has_baseline or row["name"] == baseline else
                              _paired(paired_test(accuracy[row["name"]], accuracy[baseline],
                                                  level=level)))
    adjusted = holm([r["vs_baseline"]["p"] if r["vs_baseline"] else None for r in rows])
    for row, p in zip(rows, adjusted):
        if row["vs_baseline"] is not None:
            row["vs_baseline"]["p_holm"] = p
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    comparisons = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            result = _paired(paired_test(accuracy[a["name"]], accuracy[b["name"]],
                                         level=level))
            comparisons.append({"higher": a["name"], "lower": b["name"], **(result or {
                "seeds": [], "difference": None, "t": None, "p": None, "resolved": False})})
    ranking = [c for c in comparisons
               if [r["name"] for r in rows].index(c["lower"])
               == [r["name"] for r in rows].index(c["higher"]) + 1]
    return {"baseline": baseline if has_baseline else None, "level": level,
            "variants": rows, "ranking": ranking, "comparisons": comparisons,
            "grid": _grid(rows)}


def _grid(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        conditioners = row["recipe"]["conditioners"]
        if not conditioners:
            continue
        if len(conditioners) != 1:
            return None
        c = conditioners[0]
        column = f"{c['placement']}_{c['side']}"
        if column in cells.setdefault(c["transform"], {}):
            return None  # two variants in one cell: not a transform × placement grid
        cells[c["transform"]][column] = row["name"]
    if sum(len(c) for c in cells.values()) < 2:
        return None
    return {"rows": list(cells), "columns": list(COLUMNS), "cells": cells}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def _accuracy(a: dict[str, Any]) -> str:
    if a["low"] is None:
        return f"{100 * a['mean']:.1f}%"
    return f"{100 * a['mean']:.1f}% [{_pct(a['low'])}, {_pct(a['high'])}]"


def _difference(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    if d["low"] is None:
        return _signed(d["mean"])
    return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _table(rows: list[list[str]], header: list[str], markdown: bool) -> str:
    if markdown:
        def line(r: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

        rule = "|" + "|".join(":--" if i < 2 else "--:" for i in range(len(header))) + "|"
        return "\n".join([line(header), rule, *(line(r) for r in rows)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def format_report(results: dict[str, Any], *, markdown: bool = False) -> str:
    """The report as a text table (or a Markdown one, ready to paste) and the ranking."""
    level = f"{100 * results['level']:g}%"
    baseline = results["baseline"]
    header = ["rank", "variant", "seeds", f"accuracy [{level} CI]",
              f"Δ vs {baseline} [{level} CI], points" if baseline else "Δ vs baseline",
              "p", "p (Holm)", "s/step", "peak MiB", "trainable", "entropy H"]
    rows = []
    for v in results["variants"]:
        vs = v["vs_baseline"]
        rows.append([
            str(v["rank"]), v["name"], str(len(v["seeds"])), _accuracy(v["accuracy"]),
            "baseline" if v["name"] == baseline else _difference(vs and vs["difference"]),
            _p(vs and vs["p"]), _p(vs and vs.get("p_holm")),
            "-" if v["step_time_s"] is None else f"{v['step_time_s']:.3f}",
            "-" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.0f}",
            "-" if v["trainable"] is None else f"{int(v['trainable']):,d}",
            "-" if v["entropy"] is None else f"{v['entropy']:.2f}"])
    lines = [_table(rows, header, markdown), ""]
    intro = (f"Ranking (each variant against the next one down, paired over their common "
             f"seeds; resolved: the {level} interval of the difference excludes 0):")
    lines.append(intro if not markdown else f"**{intro}**\n")
    for c in results["ranking"]:
        d = c["difference"]
        verdict = ("resolved" if c["resolved"] else
                   "not resolved" if d is not None and d["low"] is not None else
                   "not resolved (one common seed: no interval)")
        text = (f"{c['higher']} ≥ {c['lower']}: {_difference(d)} points, p = {_p(c['p'])}: "
                f"{verdict}")
        lines.append(f"- {text}" if markdown else f"  {text}")
    if not results["ranking"]:
        lines.append("  (one variant)")
    return "\n".join(lines)


def write_report(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write ``results.json``, ``results.csv`` (one row per variant), the accuracy against
    step-time plot, the paired differences from the baseline and, for a transform ×
    placement-side space, heat maps of accuracy and step time; return the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json", folder / "results.csv"]
    written[0].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n",
                          encoding="utf-8")
    written[1].write_text(_csv(results), encoding="utf-8")
    written.extend(_plots(results, folder))
    return written


def _csv(results: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "variant", "seeds", "accuracy_mean", "accuracy_low",
                     "accuracy_high", "baseline", "difference_mean", "difference_low",
                     "difference_high", "p", "p_holm", "resolved", "step_time_s",
                     "peak_bytes", "trainable", "entropy", "recipe"])
    for v in results["variants"]:
        a, vs = v["accuracy"], v["vs_baseline"]
        d = vs["difference"] if vs else None
        writer.writerow([v["rank"], v["name"], " ".join(map(str, v["seeds"])), a["mean"],
                         a["low"], a["high"], results["baseline"], d and d["mean"],
                         d and d["low"], d and d["high"], vs and vs["p"],
                         vs and vs.get("p_holm"), vs and vs["resolved"], v["step_time_s"],
                         v["peak_bytes"], v["trainable"], v["entropy"],
                         json.dumps(v["recipe"], sort_keys=True)])
    return out.getvalue()


def _plots(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    level = f"{100 * results['level']:g}%"
    variants = [v for v in results["variants"] if v["step_time_s"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for v in variants:
        a = v["accuracy"]
        error = None if a["low"] is None else [[100 * (a["mean"] - a["low"])],
                                               [100 * (a["high"] - a["mean"])]]
        ax.errorbar(1000 * v["step_time_s"], 100 * a["mean"], yerr=error, fmt="o", capsize=3)
        ax.annotate(v["name"], (1000 * v["step_time_s"], 100 * a["mean"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("time per training step, median over seeds (ms)")
    ax.set_ylabel(f"held-out accuracy (%), mean and {level} interval")
    ax.set_title("Accuracy against step time")
    fig.tight_layout()
    written.append(folder / "accuracy_vs_time.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    compared = [v for v in results["variants"] if v["vs_baseline"] is not None
                and v["vs_baseline"]["difference"]["low"] is not None]
    if compared:
        fig, ax = plt.subplots(figsize=(6, 0.5 * len(compared) + 1.6))
        for i, v in enumerate(compared):
            d = v["vs_baseline"]["difference"]
            ax.errorbar(100 * d["mean"], i, xerr=[[100 * (d["mean"] - d["low"])],
                                                  [100 * (d["high"] - d["mean"])]],
                        fmt="o", capsize=3, color="tab:green" if v["vs_baseline"]["resolved"]
                        else "tab:gray")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(compared)))
        ax.set_yticklabels([v["name"] for v in compared])
        ax.invert_yaxis()
        ax.set_xlabel(f"accuracy − {results['baseline']} (points), paired over seeds, mean "
                      f"and {level} interval")
        ax.set_title(f"Difference from {results['baseline']} (green: resolved)")
        fig.tight_layout()
        written.append(folder / "difference_from_baseline.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    grid = results["grid"]
    if grid is None:
        return written
    by_name = {v["name"]: v for v in results["variants"]}
    base = by_name.get(results["baseline"]) if results["baseline"] else None
    for metric, title, scale in (("accuracy", "held-out accuracy (%)", 100.0),
                                 ("step_time_s", "time per step (ms)", 1000.0)):
        values = [[math.nan] * len(grid["columns"]) for _ in grid["rows"]]
        labels = [[""] * len(grid["columns"]) for _ in grid["rows"]]
        for i, transform in enumerate(grid["rows"]):
            for j, column in enumerate(grid["columns"]):
                name = grid["cells"][transform].get(column)
                if name is None:
                    continue
                v = by_name[name]
                if metric == "accuracy":
                    a = v["accuracy"]
                    values[i][j] = scale * a["mean"]
                    half = "" if a["low"] is None else f"\n±{scale * (a['high'] - a['mean']):.1f}"
                    labels[i][j] = f"{values[i][j]:.1f}{half}"
                elif v["step_time_s"] is not None:
                    values[i][j] = scale * v["step_time_s"]
                    labels[i][j] = f"{values[i][j]:.0f}"
        fig, ax = plt.subplots(figsize=(1.6 * len(grid["columns"]) + 2,
                                        0.9 * len(grid["rows"]) + 1.6))
        image = ax.imshow(values, cmap="viridis" if metric == "accuracy" else "magma_r",
                          aspect="auto")
        for i, row in enumerate(labels):
            for j, text in enumerate(row):
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(grid["columns"])))
        ax.set_xticklabels(grid["columns"])
        ax.set_yticks(range(len(grid["rows"])))
        ax.set_yticklabels(grid["rows"])
        ax.set_xlabel("placement_side")
        subtitle = ""
        if base is not None:
            value = (scale * base["accuracy"]["mean"] if metric == "accuracy"
                     else scale * (base["step_time_s"] or math.nan))
            subtitle = f" ({base['name']}: {value:.1f})"
        ax.set_title(f"{title}{subtitle}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(folder / f"heatmap_{'accuracy' if metric == 'accuracy' else 'step_time'}"
                                 f".png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def results(records: Sequence[dict[str, Any]], *, sweep: dict[str, Any],
            baseline: str = "lora", level: float = 0.95,
            progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``results.json`` holds: ``sweep`` (what was asked: study, storage, space,
    seeds, schedule), ``data``, the ``environments`` the trials ran in (with counts),
    :func:`summarize` of the records, ``progress`` (pairs done, running, failed) and every
    trial's record (``trials``)."""
    environments: list[dict[str, Any]] = []
    for r in records:
        env = {k: v for k, v in r.get("environment", {}).items() if k != "date"}
        for e in environments:
            if e["environment"] == env:
                e["trials"] += 1
                break
        else:
            environments.append({"environment": env, "trials": 1})
    dates = sorted(r["environment"]["date"] for r in records if "date" in r.get("environment", {}))
    data = next((r["data"] for r in records if "data" in r), None)
    return {"sweep": sweep, "data": data, "environments": environments,
            "dates": [dates[0], dates[-1]] if dates else [],
            **summarize(records, baseline=baseline, level=level),
            "progress": progress, "trials": list(records)}
