"""The ``weightcond`` command: ``weightcond compare``, ``sweep`` and ``analyze``.

``compare`` runs :func:`weightcond.compare.run` with a progress bar (tqdm), prints a table,
and writes ``results.json``, two plots (matplotlib) and each preset's adapter into the
output directory. ``analyze`` loads a saved adapter onto its base model and reports, per
layer, the entropies, effective and stable rank and the orthogonality error of each
rotation, their means over the layers, and a plot. ``sweep`` runs
:func:`weightcond.sweep.run` with a progress bar over trials, and ``sweep report``
prints and writes its statistics (:mod:`weightcond.sweep`).

Every argument is checked before any data or model loads and before any folder is made:
a bad one is an argparse error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OptionError, WeightcondError
from .io import adapter_files
from .version import __version__

__all__ = ["main"]


def _progress(description: str, total: int) -> Callable[[int], None]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"{description:>22}", unit="step", leave=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def _table(rows: list[list[str]], header: list[str], footer: list[str] | None = None) -> str:
    """Columns padded to their widest cell; ``footer`` (a summary row) below a second rule."""
    every = [header, *rows, *([footer] if footer else [])]
    widths = [max(len(str(r[i])) for r in every) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), line, *(fmt(r) for r in rows),
                      *([line, fmt(footer)] if footer else [])])


def format_summary(results: dict[str, Any]) -> str:
    """The table ``weightcond compare`` prints (also used for the README)."""
    before = any(s.get("accuracy_before") is not None for s in results["summary"])
    header = ["preset", *(["before"] if before else []), "accuracy", "s/step", "peak MiB",
              "trainable", "entropy H"]
    rows = []
    for s in results["summary"]:
        spread = f" ± {100 * s['accuracy_std']:.1f}" if s["seeds"] > 1 else ""
        rows.append([s["preset"],
                     *([f"{100 * s['accuracy_before']:.1f}%"] if before else []),
                     f"{100 * s['accuracy']:.1f}%{spread}",
                     f"{s['step_time_s']:.3f}", f"{s['peak_bytes'] / 2**20:.0f}",
                     f"{s['trainable']:,d}",
                     "-" if s["entropy"] is None else f"{s['entropy']:.2f}"])
    return _table(rows, header)


def _plots(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    first_seed = results["settings"]["seeds"][0]
    runs = [r for r in results["runs"] if r["seed"] == first_seed and r["layers"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in runs:
        ax.plot(range(len(r["layers"])), [v["entropy"] for v in r["layers"].values()],
                marker="o", markersize=3, label=r["preset"])
    if runs:
        names = list(runs[0]["layers"])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("singular-value entropy H (σ/Σσ)")
    ax.set_title("Entropy of the effective update W' − W per layer")
    ax.legend()
    fig.tight_layout()
    written.append(folder / "entropy_per_layer.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for s in results["summary"]:
        ax.errorbar(1000 * s["step_time_s"], 100 * s["accuracy"],
                    yerr=100 * s["accuracy_std"], fmt="o")
        ax.annotate(s["preset"], (1000 * s["step_time_s"], 100 * s["accuracy"]),
                    textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("time per training step (ms)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy against time")
    fig.tight_layout()
    written.append(folder / "accuracy_vs_time.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts[2:] if p not in ("attention", "self")) or name


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def split_presets(text: str) -> list[str]:
    """``--presets``: ``;`` separates specs, and ``,`` too between specs without options
    (``"head,lora;sora:map=exp,rotation_rank=8"`` → three specs)."""
    return [name.strip() for part in text.split(";")
            for name in (part.split(",") if ":" not in part else [part]) if name.strip()]


def _output_folder(where: str, path: Path) -> Path:
    """``path`` if it is a directory or can be made one (its first existing ancestor is a
    writable directory), else raise :class:`OptionError`; nothing is created."""
    if path.exists() and not path.is_dir():
        raise OptionError(f"{where}: argument 'output' expected a directory, got "
                          f"{str(path)!r}, which is a file")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OptionError(f"{where}: argument 'output' expected a directory, got "
                          f"{str(path)!r}, under the file {str(ancestor)!r}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OptionError(f"{where}: argument 'output' expected a directory it may write, "
                          f"got {str(path)!r}, and {str(ancestor)!r} is not writable")
    return path


@contextmanager
def _created(folder: Path) -> Iterator[Path]:
    """Make ``folder`` (and missing parents); if the body fails, remove those of them that
    are still empty."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty: it holds what the run wrote before it failed
                break
        raise


def _check_compare(args: argparse.Namespace) -> None:
    from .compare import Settings

    settings = Settings.of(args.task or "sentiment", quick=args.quick)
    for key in ("steps", "batch_size", "lr", "rank", "alpha", "max_length", "train_size",
                "eval_size", "device", "threads", "model", "dtype", "base"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    if args.presets is not None:
        settings.presets = split_presets(args.presets)
    if args.seeds is not None:
        settings.seeds = args.seeds
    settings.check()
    args.settings = settings
    args.output = _output_folder("compare", Path(args.output))


def _compare(args: argparse.Namespace) -> int:
    from .compare import run

    settings = args.settings
    with _created(args.output) as folder:
        print(f"weightcond compare: {', '.join(settings.presets)}; {settings.steps} steps of "
              f"{settings.batch_size}, seeds {settings.seeds}; output in {folder}/", flush=True)
        results = run(settings, adapters=str(folder / "adapters"), progress=_progress)
        (folder / "results.json").write_text(
            json.dumps(results, indent=1, default=_json) + "\n", encoding="utf-8")
        plots = _plots(results, folder)
    env = results["environment"]
    data = results["data"]
    print()
    print(format_summary(results))
    print(f"\n{data['model']}; {data['train']} training / {data['held_out']} held-out "
          f"examples; {env['device']} ({env['threads']} threads, {env['machine']}), "
          f"{data.get('dtype', 'float32')} compute; base {data.get('base', 'float')}, "
          f"{data['base_bytes'] / 2**20:.1f} MiB as stored; entropy: "
          f"mean over the {max(len(r['layers']) for r in results['runs'])} layers measured, of "
          f"H = -Σ p log p, p = σ/Σσ of W' - W")
    print(f"wrote {folder / 'results.json'}, {', '.join(str(p) for p in plots)}")
    return 0


def _json(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _check_analyze(args: argparse.Namespace) -> None:
    where = "analyze"
    path = Path(args.path)
    missing = [n for n in adapter_files(path) if not (path / n).is_file()]
    if missing:
        state = ("does not exist" if not path.exists() else "is a file" if not path.is_dir()
                 else f"lacks {', '.join(missing)}")
        raise OptionError(f"{where}: argument 'path' expected a saved adapter directory, got "
                          f"{str(path)!r}, which {state}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise OptionError(f"{where}: argument 'model' expected a local transformers model "
                          f"directory (with a config.json), got {args.model!r}")
    args.path = path
    args.output = _output_folder(where, Path(args.output) if args.output
                                 else path.parent / f"{path.name}-analysis")


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from . import analysis
    from .io import load_adapter

    path = args.path
    if args.model is not None:
        import transformers

        try:
            model = transformers.AutoModel.from_pretrained(args.model, local_files_only=True)
        except (OSError, ValueError) as error:  # transformers' errors for unreadable models
            raise OptionError(f"analyze: argument 'model' expected a transformers model, "
                              f"got {args.model!r}: {error}") from None
    else:
        from .data import load_minilm

        model = load_minilm()[1]
    load_adapter(model, path)
    with torch.no_grad():
        report = analysis.model_report(model)
    header = ["layer", "shape", "H", "H (σ²)", "H/log n", "eff. rank", "stable rank",
              "orth. error"]
    rows = []
    for name, m in report.items():
        orth = max(m.orthogonality_errors.values(), default=None)
        rows.append([name, "×".join(map(str, m.shape)), f"{m.entropy:.3f}",
                     f"{m.energy_entropy:.3f}", f"{m.relative_entropy:.3f}",
                     f"{m.effective_rank:.1f}", f"{m.stable_rank:.2f}",
                     "-" if orth is None else f"{orth:.1e}"])
    # the mean over the layers: H's is what `weightcond compare` prints as "entropy H"
    footer = None
    if report:
        def mean(metric: str) -> float:
            return statistics.fmean(getattr(m, metric) for m in report.values())

        footer = [f"mean of {len(report)} layers", "", f"{mean('entropy'):.3f}",
                  f"{mean('energy_entropy'):.3f}", f"{mean('relative_entropy'):.3f}",
                  f"{mean('effective_rank'):.1f}", f"{mean('stable_rank'):.2f}", ""]
    print(_table(rows, header, footer))
    data = {name: {"shape": list(m.shape), "entropy": m.entropy,
                   "energy_entropy": m.energy_entropy, "relative_entropy": m.relative_entropy,
                   "effective_rank": m.effective_rank, "stable_rank": m.stable_rank,
                   "orthogonality_errors": dict(m.orthogonality_errors)}
            for name, m in report.items()}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _created(args.output) as out:
        (out / "analysis.json").write_text(json.dumps(data, indent=1) + "\n",
                                           encoding="utf-8")
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.bar(range(len(report)), [m.entropy for m in report.values()])
        ax.set_xticks(range(len(report)))
        ax.set_xticklabels([_short(n) for n in report], rotation=90, fontsize=6)
        ax.set_ylabel("singular-value entropy H (σ/Σσ)")
        ax.set_title(f"{path.name}: entropy of W' − W per layer")
        fig.tight_layout()
        fig.savefig(out / "entropy.png", dpi=120)
        plt.close(fig)
    print(f"wrote {out / 'analysis.json'}, {out / 'entropy.png'}")
    return 0


_SCHEDULE = ("steps", "batch_size", "lr", "rank", "alpha", "max_length", "train_size",
             "eval_size", "device", "threads", "model", "dtype", "base")


def _check_sweep(args: argparse.Namespace) -> None:
    import dataclasses

    from .compare import Schedule
    from .sweep import QUICK_SCHEDULE, Sweep, load_space

    if args.task not in (None, "sentiment"):  # the task's own defaults
        schedule = Schedule.of(args.task, quick=args.quick)
    else:
        schedule = QUICK_SCHEDULE if args.quick else Schedule()
    schedule = dataclasses.replace(schedule, **{k: getattr(args, k) for k in _SCHEDULE
                                                if getattr(args, k) is not None})
    output = _output_folder("sweep", Path(args.output))
    args.sweep = Sweep(space=load_space(args.space), seeds=tuple(args.seeds or (0, 1, 2)),
                       schedule=schedule, output=str(output), storage=args.storage,
                       study=args.study, jobs=args.jobs, stale_after=args.stale_after,
                       baseline=args.baseline, log=args.log).check()


def _sweep_bar() -> tuple[Callable[[Any], None], Callable[[], None]]:
    """A tqdm bar over a sweep's trials: done, running, left, time per trial."""
    from tqdm.auto import tqdm

    bar: Any = None

    def update(p: Any) -> None:
        nonlocal bar
        if bar is None:  # trials done before (an earlier run) do not count in the rate
            bar = tqdm(total=p.total, initial=p.done, desc="sweep", unit="trial", leave=True)
        bar.n = p.done
        parts = [f"running {p.running}", f"left {p.left}"]
        if p.failed:
            parts.append(f"failed {p.failed}")
        if p.trial_s is not None:
            parts.append(f"{p.trial_s:.0f} s/trial")
        bar.set_postfix_str(", ".join(parts), refresh=False)
        bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _sweep(args: argparse.Namespace) -> int:
    import time

    from .sweep import describe, format_report, results, run, write_report

    sweep = args.sweep
    pairs = len(sweep.space.variants) * len(sweep.seeds)
    with _created(Path(sweep.output)) as folder:
        print(f"weightcond sweep: space {sweep.space.name!r} ({len(sweep.space.variants)} "
              f"variants) × seeds {', '.join(map(str, sweep.seeds))} = {pairs} trials of "
              f"{sweep.schedule.steps} steps of {sweep.schedule.batch_size}; study "
              f"{sweep.study!r} in {describe(sweep)['storage']}; {sweep.jobs} job"
              f"{'s' if sweep.jobs > 1 else ''}; output in {folder}/", flush=True)
        update, close = _sweep_bar()
        last: list[Any] = []
        start = time.perf_counter()
        try:
            records = run(sweep, on_progress=lambda p: (last.append(p), update(p)))
        except KeyboardInterrupt:
            close()
            print(f"\nweightcond sweep: interrupted; the finished trials are kept in "
                  f"{describe(sweep)['storage']}: start the same command again to finish",
                  file=sys.stderr)
            return 130
        finally:
            close()
        meta = {**describe(sweep), "wall_s": time.perf_counter() - start}
        state = last[-1] if last else None
        res = results(records, sweep=meta, baseline=sweep.baseline,
                      progress=_progress_record(state) if state else None)
        written = write_report(res, folder)
    print()
    print(format_report(res, markdown=args.format == "markdown"))
    print(f"\n{_sweep_footer(res)}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    if state is not None and state.failed:
        print(f"weightcond sweep: {state.failed} of {state.total} trials failed (their errors "
              f"are above); start the sweep again to retry them", file=sys.stderr)
        return 1
    return 0


def _progress_record(value: Any) -> dict[str, Any]:
    import dataclasses

    return {**dataclasses.asdict(value), "left": value.left}


def _sweep_footer(res: dict[str, Any]) -> str:
    data = res["data"] or {}
    envs = res["environments"]
    where = "; ".join(f"{e['environment'].get('device', '?')} ({e['environment'].get('threads')}"
                      f" threads, {e['environment'].get('machine')}, "
                      f"{e['environment'].get('cpu_count')} CPUs): {e['trials']} trials"
                      for e in envs)
    wall = res["sweep"].get("wall_s")
    took = "" if wall is None else (f"; the sweep took {wall / 60:.1f} minutes "
                                    f"({res['sweep'].get('jobs', 1)} job"
                                    f"{'s' if res['sweep'].get('jobs', 1) > 1 else ''})")
    count = "{:,}".format
    return (f"{count(data.get('train', 0))} training / {count(data.get('held_out', 0))} "
            f"held-out texts; {where}{took}; intervals: Student t over seeds; p: paired "
            f"t-test; entropy H: median over seeds of the mean over the conditioned layers of "
            f"-Σ p log p, p = σ/Σσ of W' - W")


def _check_sweep_report(args: argparse.Namespace) -> None:
    from .sweep import DATABASE

    folder = Path(args.dir)
    args.source = None
    if args.storage is None and (folder / DATABASE).is_file():
        args.storage = f"sqlite:///{(folder / DATABASE).resolve()}"
    if args.storage is None:
        if not (folder / "results.json").is_file():
            raise OptionError(f"sweep report: argument 'dir' expected a sweep's output "
                              f"directory (with {DATABASE} or results.json), got "
                              f"{str(folder)!r}; or give --storage")
        args.source = folder / "results.json"
    args.dir = _output_folder("sweep report", folder)


def _sweep_report(args: argparse.Namespace) -> int:
    from .sweep import format_report, load, results, write_report

    if args.source is not None:
        try:
            old = json.loads(args.source.read_text(encoding="utf-8"))
            records, meta = old["trials"], old["sweep"]
        except (ValueError, KeyError, TypeError) as error:
            raise OptionError(f"sweep report: {str(args.source)!r} is not a sweep's "
                              f"results.json: {error}") from None
        state = old.get("progress")
    else:
        records, meta = load(args.storage, args.study)
        state = None
    if not records:
        raise OptionError(f"sweep report: no complete trial in study "
                          f"{meta.get('study', args.study)!r}")
    baseline = args.baseline or meta.get("baseline") or "lora"
    res = results(records, sweep=meta, baseline=baseline, progress=state)
    written = write_report(res, args.dir)
    print(format_report(res, markdown=args.format == "markdown"))
    print(f"\n{_sweep_footer(res)}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _sweep_parser(sub: Any) -> None:
    s = sub.add_parser(
        "sweep", help="train every variant of a space once per seed and rank them with "
        "confidence intervals (Optuna)",
        description="Train every variant of a space (presets with options or explicit "
        "stacks) once per seed on the task of 'weightcond compare' as Optuna trials, and "
        "report each variant's mean held-out accuracy with its 95% interval over seeds, "
        "paired comparisons with a baseline and a ranking. Processes started with the same "
        "--storage and --study share the work; a sweep started again finishes what is "
        "missing. 'weightcond sweep report DIR' prints and writes the statistics again.")
    s.add_argument("--space", default="paper", help="a built-in space (paper: lora, dora, "
                   "pre_diag, sora; rotations; placements) or a TOML or JSON file "
                   "(default paper)")
    s.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default 0,1,2)")
    s.add_argument("--output", default="weightcond-sweep", help="directory for the default "
                   "storage (sweep.db), results.json, results.csv and plots (default "
                   "./weightcond-sweep)")
    s.add_argument("--storage", help="an Optuna storage: an RDB URL (sqlite:///FILE, "
                   "postgresql://USER@HOST/DB, ...) or journal:FILE (default: "
                   "sqlite:///<output>/sweep.db)")
    s.add_argument("--study", default="weightcond-sweep", help="the study's name "
                   "(default weightcond-sweep)")
    s.add_argument("--jobs", type=int, default=1, help="worker processes on this machine "
                   "(default 1)")
    s.add_argument("--baseline", default="lora", help="the variant the others are compared "
                   "with (default lora)")
    s.add_argument("--stale-after", type=float, default=60.0, help="seconds without a "
                   "heartbeat after which a running trial is taken as dead and run again "
                   "(default 60)")
    s.add_argument("--log", choices=("mlflow", "tensorboard"), help="also record every trial "
                   "in MLflow or TensorBoard (if installed)")
    s.add_argument("--format", choices=("text", "markdown"), default="text",
                   help="the report's table (default text)")
    _schedule_options(s)
    s.add_argument("--quick", action="store_true", help="a smoke run of the whole path "
                   "(about a minute for the paper space): 8 steps of 16 texts per trial, 64 "
                   "held-out texts")
    s.set_defaults(check=_check_sweep, run=_sweep, parser=s)
    actions = s.add_subparsers(dest="action", title="subcommand", metavar="{report}")
    r = actions.add_parser("report", help="print and write the statistics of a sweep",
                           description="Print a sweep's statistics and write results.json, "
                           "results.csv and the plots into DIR, from its storage (DIR/sweep.db,"
                           " or --storage) or from DIR/results.json.")
    r.add_argument("dir", help="the sweep's output directory")
    r.add_argument("--storage", help="the sweep's storage, if not DIR/sweep.db")
    r.add_argument("--study", default="weightcond-sweep", help="the study's name (default "
                   "weightcond-sweep)")
    r.add_argument("--baseline", help="the variant the others are compared with (default: "
                   "the sweep's)")
    r.add_argument("--format", choices=("text", "markdown"), default="text",
                   help="the report's table (default text)")
    r.set_defaults(check=_check_sweep_report, run=_sweep_report, parser=r)


def _schedule_options(p: argparse.ArgumentParser) -> None:
    """The options of a :class:`weightcond.compare.Schedule` (compare and sweep)."""
    p.add_argument("--steps", type=int, help="optimizer steps per run, at least 3 (default "
                   "120)")
    p.add_argument("--batch-size", type=int, help="texts per step (default 32)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--rank", type=int, help="update rank (default 8)")
    p.add_argument("--alpha", type=float, help="update alpha (default 16)")
    p.add_argument("--max-length", type=int, help="tokens per text (default 64)")
    p.add_argument("--train-size", type=int, help="training texts used (default all)")
    p.add_argument("--eval-size", type=int, help="held-out texts used (default all)")
    p.add_argument("--device", help="cpu (default), cuda or cuda:<index>")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    p.add_argument("--task", choices=("sentiment", "arithmetic"),
                   help="sentiment (default): MiniLM on Rotten Tomatoes; arithmetic: a causal "
                   "LM on generated arithmetic word problems (defaults: 100 steps of 16, 200 "
                   "held-out problems; --quick: 6 steps of 8, 24 held out)")
    p.add_argument("--model", help="the arithmetic task's causal LM: smollm2-135m (default) "
                   "or gemma3-270m")
    p.add_argument("--dtype", help="compute dtype: auto (default: bfloat16 autocast for "
                   "arithmetic where the device supports it, else float32), float32 or "
                   "bfloat16")
    p.add_argument("--base", help="the frozen model as stored: float (default), nf4 "
                   "(bitsandbytes 4-bit) or int8 (bitsandbytes LLM.int8()), quantized before "
                   "conditioning; needs weightcond[quant]")


def parser() -> argparse.ArgumentParser:
    """The command line of ``weightcond``."""
    top = argparse.ArgumentParser(
        prog="weightcond", description="Weight conditioning for parameter-efficient "
        "fine-tuning: compare presets on a real model, sweep a design space with confidence "
        "intervals, analyze saved adapters.")
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare", help="fine-tune MiniLM on Rotten Tomatoes (or a causal LM on arithmetic) "
        "with each preset and compare",
        description="Fine-tune the packaged MiniLM with a linear head on the Rotten Tomatoes "
        "snippets (--task arithmetic: SmolLM2-135M or Gemma-3-270M on generated arithmetic "
        "word problems) once per preset (same seed, data order, steps and learning rate) and "
        "compare held-out accuracy, time per step, peak memory, trainable parameters and the "
        "singular-value entropy of the effective update.")
    c.add_argument("--presets", help="comma-separated presets (default head,lora,dora,"
                   "pre_diag,sora; for arithmetic lora,dora,pre_diag,sora,oft); with options, "
                   "separate presets by ';': "
                   "'lora;sora:map=exp,rotation_rank=8'")
    _schedule_options(c)
    c.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default 0)")
    c.add_argument("--output", default="weightcond-compare",
                   help="directory for results.json, plots and adapters "
                   "(default ./weightcond-compare)")
    c.add_argument("--quick", action="store_true",
                   help="a CI-sized run (under a minute): 12 steps on 192 texts")
    c.set_defaults(check=_check_compare, run=_compare, parser=c)
    a = sub.add_parser("analyze", help="report the spectrum of a saved adapter per layer",
                       description="Load a saved adapter onto its base model and report, "
                       "per layer, entropy, effective and stable rank and the orthogonality "
                       "error of each rotation, with a plot.")
    a.add_argument("path", help="a directory written by weightcond.save_adapter (or by "
                   "weightcond compare under <output>/adapters/)")
    a.add_argument("--model", help="the base model: a local transformers model directory "
                   "(default: the packaged MiniLM)")
    a.add_argument("--output", help="directory for analysis.json and entropy.png "
                   "(default: <path>-analysis beside the adapter)")
    a.set_defaults(check=_check_analyze, run=_analyze, parser=a)
    _sweep_parser(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``weightcond`` with ``argv`` (default: the process arguments); return the exit
    status.

    Every argument is checked first (the command's ``check``): an invalid one is reported
    as argparse reports a malformed one, with the usage line, and returns 2, before any
    data or model loads and before any folder is made. ``--help`` and ``--version`` return
    0. A :class:`~weightcond.WeightcondError` while the command runs is printed and
    returns 2.
    """
    try:
        args = parser().parse_args(argv)
        try:
            args.check(args)
        except WeightcondError as error:
            args.parser.error(str(error))
    except SystemExit as stop:  # argparse's exit: an error, --help or --version
        return int(stop.code or 0)
    try:
        return int(args.run(args))
    except WeightcondError as error:
        print(f"weightcond {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
