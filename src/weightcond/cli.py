"""The ``weightcond`` command: ``weightcond compare`` and ``weightcond analyze``.

``compare`` runs :func:`weightcond.compare.run` with a progress bar (tqdm), prints a table,
and writes ``results.json``, two plots (matplotlib) and each preset's adapter into the
output directory. ``analyze`` loads a saved adapter onto its base model and reports, per
layer, the entropies, effective and stable rank and the orthogonality error of each
rotation, their means over the layers, and a plot.

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

from . import __version__
from .errors import OptionError, WeightcondError
from .io import adapter_files

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
    header = ["preset", "accuracy", "s/step", "peak MiB", "trainable", "entropy H"]
    rows = []
    for s in results["summary"]:
        spread = f" ± {100 * s['accuracy_std']:.1f}" if s["seeds"] > 1 else ""
        rows.append([s["preset"], f"{100 * s['accuracy']:.1f}%{spread}",
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

    settings = Settings.quick() if args.quick else Settings()
    for key in ("steps", "batch_size", "lr", "rank", "alpha", "max_length", "train_size",
                "eval_size", "device", "threads"):
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
    print()
    print(format_summary(results))
    print(f"\n{results['data']['train']} training / {results['data']['held_out']} held-out "
          f"texts; {env['device']} ({env['threads']} threads, {env['machine']}); entropy: "
          f"mean over the {max(len(r['layers']) for r in results['runs'])} conditioned layers of "
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


def parser() -> argparse.ArgumentParser:
    """The command line of ``weightcond``."""
    top = argparse.ArgumentParser(
        prog="weightcond", description="Weight conditioning for parameter-efficient "
        "fine-tuning: compare presets on a real model, analyze saved adapters.")
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare", help="fine-tune MiniLM on Rotten Tomatoes with each preset and compare",
        description="Fine-tune the packaged MiniLM with a linear head on the Rotten Tomatoes "
        "snippets once per preset (same seed, data order, steps and learning rate) and "
        "compare held-out accuracy, time per step, peak memory, trainable parameters and the "
        "singular-value entropy of the effective update.")
    c.add_argument("--presets", help="comma-separated presets (default head,lora,dora,"
                   "pre_diag,sora); with options, separate presets by ';': "
                   "'lora;sora:map=exp,rotation_rank=8'")
    c.add_argument("--steps", type=int, help="optimizer steps per run, at least 3 (default "
                   "120)")
    c.add_argument("--batch-size", type=int, help="texts per step (default 32)")
    c.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    c.add_argument("--rank", type=int, help="update rank (default 8)")
    c.add_argument("--alpha", type=float, help="update alpha (default 16)")
    c.add_argument("--max-length", type=int, help="tokens per text (default 64)")
    c.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default 0)")
    c.add_argument("--train-size", type=int, help="training texts used (default all)")
    c.add_argument("--eval-size", type=int, help="held-out texts used (default all)")
    c.add_argument("--device", help="cpu (default), cuda or cuda:<index>")
    c.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
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
