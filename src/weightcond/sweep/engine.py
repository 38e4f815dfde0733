"""The sweep on Optuna: one trial per (variant, seed), enqueued once, run once.

Every pair of a variant and a seed is a trial of an Optuna study, enqueued as a ``WAITING``
trial whose user attributes hold the variant's name, the seed and the full recipe. Workers
(processes on one or several machines, against the same storage and study) claim waiting
trials with the storage's atomic ``WAITING → RUNNING`` transition, train them through
:func:`weightcond.compare.train_run` and store the result (user attribute ``record``) with
the ``COMPLETE`` state. Note (exactly once):

* **Claim.** Only one worker wins a trial's ``WAITING → RUNNING`` transition (a row lock
  on an RDB, the log's order in a journal file).
* **Duplicates.** Two processes started at the same moment may both enqueue a pair. After
  a claim the worker reads the pair's other trials and runs its own only if none is
  complete and none with a lower number waits or runs; otherwise it marks its trial
  ``PRUNED`` (``weightcond:duplicate_of``) without training. Of two claimed duplicates
  the lower number always runs, so they never drop each other.
* **Death.** A running trial records a heartbeat (a counter, system attribute
  ``weightcond:beat``, every ``stale_after / 4`` seconds). A worker with nothing to claim
  watches the running trials; one whose counter has not moved for ``stale_after`` seconds
  of the watcher's own clock (no clocks are compared across machines) is set ``FAIL``
  (one watcher wins that transition) and enqueued again. A trial whose worker ran on the
  watcher's own machine (the same boot and PID namespace, ``weightcond:host``) and whose
  process no longer exists is taken as dead at once: a sweep killed with ``kill -9`` and
  started again on the same machine reruns the killed trial without waiting. A worker
  killed at any moment therefore loses at most the trial it was running.
* **Finished.** A pair with a ``COMPLETE`` trial is never enqueued or run again; a result is
  written (one attribute) before its ``COMPLETE`` state, so a trial is complete with its
  result or not at all. A worker whose trial was taken as dead meanwhile (a storage
  outage longer than ``stale_after``) drops its result and goes on.
* **Errors.** A trial that raises is set ``FAIL`` with the error (user attribute
  ``error``) and not retried by the running workers; a sweep started again retries it.

Optuna's own heartbeat (``RDBStorage(heartbeat_interval=...)``) exists only for RDB
storages and compares timestamps; the counter works the same on every storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compare import Schedule, load_task, train_run
from ..errors import OptionError, StateError, WeightcondError, check_int
from ..profiling import machine
from .space import Space, Variant
from .trackers import check_tracker, open_tracker

__all__ = ["DATABASE", "DEFAULT_STUDY", "QUICK_SCHEDULE", "Progress", "Sweep", "collect",
           "describe", "load", "open_storage", "prepare", "progress", "run", "work"]

DEFAULT_STUDY = "weightcond-sweep"
#: The default storage's file name in the output folder.
DATABASE = "sweep.db"
#: The schedule of ``weightcond sweep --quick``: a smoke run of the whole path (every
#: variant and seed of the space, the storage, the report) in about a minute on 2 CPU cores
#: for the ``paper`` space (12 trials). 8 steps and 64 held-out texts say nothing about the
#: variants: their accuracies are at the constant guess's level.
QUICK_SCHEDULE = Schedule(steps=8, batch_size=16, max_length=32, train_size=128, eval_size=64)
_BEAT = "weightcond:beat"
_WORKER = "weightcond:worker"
_HOST = "weightcond:host"  # the worker's boot and PID namespace: where its PID means something
_STALE = "weightcond:stale"  # the worker that took a running trial as dead
_DUPLICATE = "weightcond:duplicate_of"
_RETRY = "weightcond:retry_of"
_DATA = "weightcond:data"  # study attribute: the data fields every trial shares
_DATA_FIELDS = ("max_length", "train_size", "eval_size", "task", "model", "base")
_DATA_DEFAULTS = {"task": "sentiment", "model": None, "base": "float"}  # fields added later
_SWEEP = "weightcond:sweep"  # study attribute: what the last sweep started on it asked
OPTUNA_INSTALL = 'pip install "weightcond[sweep]"'


def _optuna() -> Any:
    try:
        import optuna
    except ModuleNotFoundError:
        from ..data import MissingPackageError

        raise MissingPackageError(f"weightcond sweep runs on Optuna, which is not installed: "
                                  f"{OPTUNA_INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class Sweep:
    """One sweep: what runs (a space, seeds, a schedule) and where its trials live.

    Attributes:
        space: the variants (:func:`weightcond.sweep.load_space`).
        seeds: one trial per variant and seed.
        schedule: the base schedule (a variant may change ``steps``, ``batch_size``, ``lr``,
            ``rank``, ``alpha``).
        output: the folder for the default storage, the results and the plots.
        storage: an Optuna storage: an RDB URL (``sqlite:///...``,
            ``postgresql://...``, ``mysql://...``) or ``journal:PATH`` (a journal file);
            ``None``: ``sqlite:///<output>/sweep.db``.
        study: the study's name; processes with the same storage and study share the work.
        jobs: worker processes on this machine.
        stale_after: seconds without a heartbeat after which a running trial is taken as
            dead and run again.
        baseline: the variant every other is compared with.
        log: also record every trial in ``"mlflow"`` or ``"tensorboard"`` (``None``: not).
    """

    space: Space
    seeds: tuple[int, ...] = (0, 1, 2)
    schedule: Schedule = field(default_factory=Schedule)
    output: str = "weightcond-sweep"
    storage: str | None = None
    study: str = DEFAULT_STUDY
    jobs: int = 1
    stale_after: float = 60.0
    baseline: str = "lora"
    log: str | None = None

    def check(self) -> Sweep:
        """Validate everything without loading the model, the data or the storage: the
        seeds, the schedule, every variant on stand-in layers (:meth:`Space.check`), the
        storage's form, the jobs and the logger; return the sweep.

        Raises:
            OptionError: the first problem; the message names the argument or the variant
                and its field.
        """
        where = "sweep"
        if not isinstance(self.space, Space):
            raise OptionError(f"{where}: argument 'space' expected a Space, got {self.space!r}")
        seeds = self.seeds
        if not isinstance(seeds, tuple) or not seeds or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63
                for s in seeds) or len(set(seeds)) < len(seeds):
            raise OptionError(f"{where}: argument 'seeds' expected a non-empty tuple of "
                              f"distinct ints in [0, 2**63), got {seeds!r}")
        self.schedule.check(where)
        self.space.check(self.schedule)
        check_int(where, "jobs", self.jobs)
        if isinstance(self.stale_after, bool) or not isinstance(self.stale_after, (int, float)) \
                or not 0 < self.stale_after < math.inf:
            raise OptionError(f"{where}: argument 'stale_after' expected a number of seconds "
                              f"> 0, got {self.stale_after!r}")
        if not isinstance(self.study, str) or not self.study.strip():
            raise OptionError(f"{where}: argument 'study' expected a non-empty name, got "
                              f"{self.study!r}")
        if self.storage is not None:
            _storage_kind(self.storage)
        if self.baseline not in self.space.names():
            raise OptionError(f"{where}: argument 'baseline' expected one of the space's "
                              f"variants ({', '.join(map(repr, self.space.names()))}), got "
                              f"{self.baseline!r}")
        check_tracker(self.log)
        if importlib.util.find_spec("optuna") is None:
            from ..data import MissingPackageError

            raise MissingPackageError(f"weightcond sweep runs on Optuna, which is not "
                                      f"installed: {OPTUNA_INSTALL}")
        return self

    @property
    def storage_url(self) -> str:
        """The storage URL, :attr:`storage` or else the SQLite file ``sweep.db`` in
        :attr:`output`."""
        if self.storage is not None:
            return self.storage
        return f"sqlite:///{Path(self.output).resolve() / DATABASE}"

    def pairs(self) -> list[tuple[Variant, int]]:
        """Every (variant, seed), seed by seed: the order trials are enqueued in, so that a
        partial sweep holds whole seeds to compare."""
        return [(v, s) for s in self.seeds for v in self.space.variants]

    def threads(self) -> int | None:
        """The torch threads of each worker: the schedule's, or the CPUs shared among
        :attr:`jobs` (``None`` with one job: torch's default)."""
        if self.schedule.threads is not None or self.jobs == 1:
            return self.schedule.threads
        return max(1, (os.cpu_count() or 1) // self.jobs)


def _storage_kind(url: str) -> str:
    if isinstance(url, str) and url.startswith("journal:") and len(url) > len("journal:"):
        return "journal"
    if isinstance(url, str) and "://" in url.split("?", 1)[0]:
        return "rdb"
    raise OptionError(f"sweep: argument 'storage' expected an Optuna RDB URL "
                      f"('sqlite:///FILE', 'postgresql://USER@HOST/DB', 'mysql://...') or "
                      f"'journal:FILE' (a journal file), got {url!r}")


def open_storage(url: str) -> Any:
    """The Optuna storage for a URL: an RDB URL (SQLAlchemy's form) or ``journal:PATH``.

    Raises:
        OptionError: a URL of neither form, or a storage that cannot be opened (the message
            gives the driver's error).
    """
    optuna = _optuna()
    kind = _storage_kind(url)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several processes write one file: wait for its lock instead of failing
        engine = {"connect_args": {"timeout": 120}}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except ImportError as error:  # the database's driver
            raise OptionError(f"sweep: argument 'storage' needs a database driver that is not "
                              f"installed ({error}), for {_masked(url)!r}") from None
        except Exception as error:  # SQLAlchemy's errors
            # two processes creating the tables of a new database at once: one of them
            # fails on the schema (a table or version row that now exists, a lock); the
            # next attempt finds the schema made
            transient = any(word in str(error) for word in (
                "already exists", "locked", "UNIQUE constraint", "duplicate key"))
            if attempt == 4 or not transient:
                raise OptionError(f"sweep: argument 'storage' could not be opened "
                                  f"({_masked(url)!r}): {error}") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _masked(url: str) -> str:
    """``url`` with its password hidden."""
    head, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        credentials, _, host = rest.partition("@")
        user, colon, _ = credentials.partition(":")
        return f"{head}://{user}{':***' if colon else ''}@{host}"
    return url


def _host() -> str | None:
    """This process's boot and PID namespace (Linux), or ``None``: two processes with the
    same value see the same PIDs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _gone(trial: Any, host: str | None) -> bool:
    """Whether a running trial's worker process ran here and no longer exists."""
    worker = trial.system_attrs.get(_WORKER, "")
    pid = worker.rpartition(":")[2]
    if host is None or trial.system_attrs.get(_HOST) != host or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by another user
        return False
    return False


def _key(trial: Any) -> tuple[str, int] | None:
    attrs = trial.user_attrs
    if "variant" in attrs and "seed" in attrs:
        return attrs["variant"], attrs["seed"]
    return None


def prepare(sweep: Sweep) -> tuple[Any, Any]:
    """Open the storage, create or load the study, check that the study's trials agree with
    this sweep (the same data fields; the same recipe under each variant name) and enqueue
    every pair that has no waiting, running or complete trial; return ``(storage, study)``.

    Raises:
        StateError: the study holds other data fields or another recipe under one of the
            space's names.
    """
    optuna = _optuna()
    if sweep.storage is None:
        Path(sweep.output).mkdir(parents=True, exist_ok=True)
    storage = open_storage(sweep.storage_url)
    try:  # one process creates the study (atomic in every storage) and enqueues first
        study = optuna.create_study(study_name=sweep.study, storage=storage,
                                    direction="maximize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=sweep.study, storage=storage)
        created = False
    study_id = storage.get_study_id_from_name(sweep.study)
    data = {k: getattr(sweep.schedule, k) for k in _DATA_FIELDS}
    # the creator writes the data fields after its trials are enqueued: a process started
    # at the same moment waits for them (Note (exactly once), duplicates), up to a limit in
    # case the creator died
    deadline = time.monotonic() + 30.0
    stored = storage.get_study_system_attrs(study_id).get(_DATA)
    while stored is None and not created and time.monotonic() < deadline:
        time.sleep(0.2)
        stored = storage.get_study_system_attrs(study_id).get(_DATA)
    if stored is not None:  # a study from before a field existed ran with its default
        stored = {**_DATA_DEFAULTS, **stored}
    if stored is not None and stored != data:
        raise StateError(f"sweep: study {sweep.study!r} in {_masked(sweep.storage_url)!r} holds "
                         f"trials with {_fields(stored)}; this sweep asks for {_fields(data)} "
                         f"(use another --study or --output)")
    storage.set_study_system_attr(study_id, _SWEEP, describe(sweep))
    trials = study.get_trials(deepcopy=False)
    recipes = {v.name: v.recipe(sweep.schedule) for v in sweep.space.variants}
    for t in trials:
        key = _key(t)
        if key is None or key[0] not in recipes:
            continue
        theirs, ours = t.user_attrs.get("recipe"), recipes[key[0]]
        if theirs != ours:
            theirs = theirs or {}
            changed = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
                                for k in sorted(set(theirs) | set(ours))
                                if theirs.get(k) != ours.get(k))
            raise StateError(
                f"sweep: study {sweep.study!r} already has a variant {key[0]!r} with another "
                f"recipe ({changed}); give the variant another name, or use another --study "
                f"or --output")
    active = {_key(t) for t in trials if t.state.name in ("WAITING", "RUNNING", "COMPLETE")}
    for variant, seed in sweep.pairs():
        if (variant.name, seed) not in active:
            _enqueue(study, variant.name, seed, recipes[variant.name])
    if stored is None:
        storage.set_study_system_attr(study_id, _DATA, data)
    return storage, study


def describe(sweep: Sweep) -> dict[str, Any]:
    """What a sweep asked, for its results: study, storage (password hidden), space,
    variants, seeds, schedule, jobs, baseline."""
    return {"study": sweep.study, "storage": _masked(sweep.storage_url),
            "space": sweep.space.name, "description": sweep.space.description,
            "variants": sweep.space.names(), "seeds": list(sweep.seeds),
            "schedule": dataclasses.asdict(sweep.schedule), "jobs": sweep.jobs,
            "baseline": sweep.baseline}


def load(storage: str, study: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records of a study's complete trials (:func:`collect`) and what the last sweep
    started on it asked (:func:`describe`), for ``weightcond sweep report``.

    Raises:
        OptionError: no such study in the storage (the message lists those there).
    """
    optuna = _optuna()
    opened = open_storage(storage)
    names = [s.study_name for s in opened.get_all_studies()]
    if study not in names:
        raise OptionError(f"sweep report: argument 'study' expected one of the studies in "
                          f"{_masked(storage)!r} ({', '.join(map(repr, names)) or 'none'}), "
                          f"got {study!r}")
    loaded = optuna.load_study(study_name=study, storage=opened)
    meta = opened.get_study_system_attrs(opened.get_study_id_from_name(study)).get(_SWEEP, {})
    return collect(loaded), {**meta, "storage": _masked(storage)}


def _fields(data: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in data.items())


def _enqueue(study: Any, name: str, seed: int, recipe: dict[str, Any],
             retry_of: int | None = None) -> None:
    optuna = _optuna()
    system = {_RETRY: retry_of} if retry_of is not None else {}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING,
        user_attrs={"variant": name, "seed": seed, "recipe": recipe}, system_attrs=system))


@dataclass(frozen=True)
class Progress:
    """Where a sweep stands, read from its storage (every worker's trials count).

    Attributes:
        total: the pairs of the sweep.
        done: pairs with a complete trial.
        running: pairs being trained now.
        failed: pairs whose last trial raised an error (retried when a sweep starts again).
        trial_s: the mean wall time of a complete trial, seconds (``None`` before the first).
    """

    total: int
    done: int
    running: int
    failed: int
    trial_s: float | None

    @property
    def left(self) -> int:
        """Pairs neither done nor running."""
        return self.total - self.done - self.running


def progress(sweep: Sweep, study: Any) -> Progress:
    """Count the sweep's pairs by state in ``study``."""
    keys = {(v.name, s) for v, s in sweep.pairs()}
    states: dict[tuple[str, int], set[str]] = {k: set() for k in keys}
    walls = []
    errors: set[tuple[str, int]] = set()
    for t in study.get_trials(deepcopy=False):
        key = _key(t)
        if key not in keys:
            continue
        states[key].add(t.state.name)
        if t.state.name == "COMPLETE" and "record" in t.user_attrs:
            walls.append(t.user_attrs["record"].get("wall_s", math.nan))
        if t.state.name == "FAIL" and "error" in t.user_attrs:
            errors.add(key)
    done = sum("COMPLETE" in s for s in states.values())
    running = sum("RUNNING" in s and "COMPLETE" not in s for s in states.values())
    failed = sum(k in errors and not states[k] & {"COMPLETE", "RUNNING", "WAITING"}
                 for k in keys)
    walls = [w for w in walls if math.isfinite(w)]
    return Progress(len(keys), done, running, failed, statistics.fmean(walls) if walls else None)


class _Heartbeat:
    """A thread that counts up a running trial's ``weightcond:beat`` attribute."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval),
                                        daemon=True, name="weightcond-sweep-heartbeat")

    def _beat(self, storage: Any, trial_id: int, interval: float) -> None:
        count = 0
        while not self._stop.wait(interval):
            count += 1
            try:
                storage.set_trial_system_attr(trial_id, _BEAT, count)
            except Exception:  # a storage hiccup: the next beat tries again
                continue

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _trial_id(storage: Any, study_id: int, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def work(sweep: Sweep, *, storage: Any = None, study: Any = None,
         on_trial: Callable[[dict[str, Any]], None] | None = None,
         poll: float | None = None) -> int:
    """Run the sweep's waiting trials in this process until every pair is complete or has
    failed; return the number of trials this process trained.

    Claims, duplicates, heartbeats and dead workers are handled as the module says. The
    data and the model load once, when the first trial is claimed.

    Args:
        sweep: the sweep (its study must exist: :func:`prepare`).
        storage, study: an open storage and study (default: opened from the sweep).
        on_trial: called with each trial's record after it is stored.
        poll: seconds between looks at the storage while others run (default
            ``min(2, stale_after / 4)``).
    """
    optuna = _optuna()
    state = optuna.trial.TrialState
    if storage is None or study is None:
        storage = open_storage(sweep.storage_url)
        study = optuna.load_study(study_name=sweep.study, storage=storage)
    poll = min(2.0, sweep.stale_after / 4) if poll is None else poll
    study_id = storage.get_study_id_from_name(study.study_name)
    keys = {(v.name, s): v for v, s in sweep.pairs()}
    worker = f"{socket.gethostname()}:{os.getpid()}"
    host = _host()
    watched: dict[int, tuple[Any, float]] = {}
    task = None
    trained = 0
    while True:
        trials = [t for t in study.get_trials(deepcopy=False) if _key(t) in keys]
        _requeue_lost(study, trials, keys, sweep)
        claimed = None
        for t in sorted((t for t in trials if t.state == state.WAITING), key=lambda t: t.number):
            trial_id = _trial_id(storage, study_id, t.number)
            try:
                if storage.set_trial_state_values(trial_id, state.RUNNING):
                    claimed = t
                    break
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        if claimed is None:
            running = [t for t in trials if t.state == state.RUNNING]
            if not running and not any(t.state == state.WAITING for t in trials):
                return trained
            _reap(storage, study, study_id, running, watched, sweep, worker, host)
            time.sleep(poll)
            continue
        trial_id = _trial_id(storage, study_id, claimed.number)
        storage.set_trial_system_attr(trial_id, _WORKER, worker)
        if host is not None:
            storage.set_trial_system_attr(trial_id, _HOST, host)
        rival = _rival(study, claimed)
        if rival is not None:
            storage.set_trial_system_attr(trial_id, _DUPLICATE, rival)
            storage.set_trial_state_values(trial_id, state.PRUNED)
            continue
        if task is None:
            threads = sweep.threads()
            task = load_task(dataclasses.replace(sweep.schedule, threads=threads))
        record = _run_trial(sweep, storage, study, trial_id, claimed, keys[_key(claimed)], task,
                            worker)
        trained += 1
        if record is not None and on_trial is not None:
            try:
                on_trial(record)
            except Exception as error:  # a tracker's failure: the study has the result
                print(f"weightcond sweep: trial {record['trial']} ({record['variant']}, seed "
                      f"{record['seed']}) is stored, but logging it failed: "
                      f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)


def _requeue_lost(study: Any, trials: list[Any], keys: dict[tuple[str, int], Variant],
                  sweep: Sweep) -> None:
    """Enqueue pairs left with no waiting, running or complete trial by a death (a ``FAIL``
    without an error) or by duplicates that dropped each other."""
    by_key: dict[tuple[str, int], list[Any]] = {}
    for t in trials:
        by_key.setdefault(_key(t), []).append(t)
    for key, group in by_key.items():
        if any(t.state.name in ("WAITING", "RUNNING", "COMPLETE") for t in group):
            continue
        last = max(group, key=lambda t: t.number)
        if last.state.name == "FAIL" and "error" in last.user_attrs:
            continue  # raised: retried when a sweep starts again
        _enqueue(study, key[0], key[1], keys[key].recipe(sweep.schedule), retry_of=last.number)


def _rival(study: Any, trial: Any) -> int | None:
    """The number of another trial of the same pair that is complete, or runs or waits with
    a lower number (then ``trial`` must not run), else ``None``."""
    key = _key(trial)
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or _key(t) != key:
            continue
        name = t.state.name
        if name == "COMPLETE" or (name in ("RUNNING", "WAITING") and t.number < trial.number):
            return t.number
    return None


def _reap(storage: Any, study: Any, study_id: int, running: list[Any],
          watched: dict[int, tuple[Any, float]], sweep: Sweep, watcher: str,
          host: str | None) -> None:
    """Fail the running trials whose heartbeat has not moved for ``stale_after`` seconds or
    whose worker process on this machine is gone, and enqueue each again."""
    optuna = _optuna()
    now = time.monotonic()
    for t in running:
        if not _gone(t, host):
            beat = t.system_attrs.get(_BEAT)
            seen = watched.get(t.number)
            if seen is None or seen[0] != beat:
                watched[t.number] = (beat, now)
                continue
            if now - seen[1] < sweep.stale_after:
                continue
        trial_id = _trial_id(storage, study_id, t.number)
        try:  # a finished trial takes no attribute: say why first, then fail it
            storage.set_trial_system_attr(trial_id, _STALE, watcher)
            won = storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # completed or failed meanwhile
            won = False
        if won:
            variant = sweep.space[t.user_attrs["variant"]]
            _enqueue(study, variant.name, t.user_attrs["seed"], variant.recipe(sweep.schedule),
                     retry_of=t.number)


def _run_trial(sweep: Sweep, storage: Any, study: Any, trial_id: int, trial: Any,
               variant: Variant, task: Any, worker: str) -> dict[str, Any] | None:
    optuna = _optuna()
    state = optuna.trial.TrialState
    seed = trial.user_attrs["seed"]
    schedule = dataclasses.replace(variant.schedule(sweep.schedule), threads=task.schedule.threads)
    target, options = variant.target()
    start = time.perf_counter()
    try:
        with _Heartbeat(storage, trial_id, sweep.stale_after / 4):
            result, _ = train_run(task, schedule, target, options, seed)
    except KeyboardInterrupt:  # give the pair back now rather than after stale_after
        storage.set_trial_state_values(trial_id, state.FAIL)
        _enqueue(study, variant.name, seed, variant.recipe(sweep.schedule),
                 retry_of=trial.number)
        raise
    except Exception as error:  # the trial's own failure: recorded, the sweep goes on
        storage.set_trial_user_attr(trial_id, "error", f"{type(error).__name__}: {error}")
        storage.set_trial_state_values(trial_id, state.FAIL)
        print(f"weightcond sweep: trial {trial.number} ({variant.name}, seed {seed}) failed: "
              f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return None
    record = {"variant": variant.name, "seed": seed, "trial": trial.number,
              "recipe": trial.user_attrs["recipe"],
              **{k: v for k, v in result.items() if k not in ("name", "seed")},
              "wall_s": time.perf_counter() - start, "worker": worker,
              "environment": machine(schedule.device), "data": task.data()}
    record = _plain(record)
    try:
        storage.set_trial_user_attr(trial_id, "record", record)
        storage.set_trial_state_values(trial_id, state.COMPLETE, values=[record["accuracy"]])
    except optuna.exceptions.UpdateFinishedTrialError:
        print(f"weightcond sweep: trial {trial.number} ({variant.name}, seed {seed}) was taken "
              f"as dead (no heartbeat for {sweep.stale_after:g} s) and is run again; this "
              f"result is dropped", file=sys.stderr, flush=True)
        return None
    return record


def _plain(value: Any) -> Any:
    """JSON values for a storage: NaN becomes ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def collect(study: Any) -> list[dict[str, Any]]:
    """The records of the study's complete trials, in trial order."""
    return [t.user_attrs["record"] for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and "record" in t.user_attrs]


def _worker_main(sweep: Sweep) -> None:
    """A ``--jobs`` worker process."""
    tracker = open_tracker(sweep)
    try:
        work(sweep, on_trial=tracker.log if tracker else None)
    except KeyboardInterrupt:
        pass
    finally:
        if tracker is not None:
            tracker.close()


def run(sweep: Sweep, *, on_progress: Callable[[Progress], None] | None = None
        ) -> list[dict[str, Any]]:
    """Prepare the study, run its trials with :attr:`Sweep.jobs` worker processes (one: in
    this process) until every pair is complete or has failed, and return the records of
    the study's complete trials (:func:`collect`).

    Args:
        sweep: the sweep (checked first, :meth:`Sweep.check`).
        on_progress: called with a :class:`Progress` every few seconds and at the end.

    Raises:
        WeightcondError: a bad setting (before anything loads), a study that disagrees with
            the sweep, or a worker process that died (exit status).
    """
    sweep.check()
    storage, study = prepare(sweep)
    stop = threading.Event()

    def watch() -> None:
        while True:
            if on_progress is not None:
                # a storage hiccup: the next look tries again
                with contextlib.suppress(Exception):
                    on_progress(progress(sweep, study))
            if stop.wait(2.0):
                return

    watcher = threading.Thread(target=watch, daemon=True, name="weightcond-sweep-progress")
    watcher.start()
    try:
        if sweep.jobs == 1:
            tracker = open_tracker(sweep)
            try:
                work(sweep, storage=storage, study=study,
                     on_trial=tracker.log if tracker else None)
            finally:
                if tracker is not None:
                    tracker.close()
        else:
            context = multiprocessing.get_context("spawn")
            workers = [context.Process(target=_worker_main, args=(sweep,),
                                       name=f"weightcond-sweep-{i}") for i in range(sweep.jobs)]
            for p in workers:
                p.start()
            try:
                for p in workers:
                    p.join()
            except BaseException:
                # interrupted: let each worker give its trial back (KeyboardInterrupt in
                # the worker), then stop the ones that do not exit
                for p in workers:
                    if p.is_alive() and p.pid is not None:
                        os.kill(p.pid, signal.SIGINT)
                for p in workers:
                    p.join(timeout=30)
                    if p.is_alive():
                        p.terminate()
                        p.join()
                raise
            dead = [p.exitcode for p in workers if p.exitcode]
            if dead:
                raise WeightcondError(f"sweep: {len(dead)} of {sweep.jobs} worker processes "
                                      f"exited with status {', '.join(map(str, dead))}")
    finally:
        stop.set()
        watcher.join()
    if on_progress is not None:
        on_progress(progress(sweep, study))
    return collect(study)
