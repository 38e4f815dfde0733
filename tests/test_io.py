"""Saving and loading adapters (:mod:`weightcond.io`).

Round trips are bit-exact (``torch.equal``) for every preset on real transformers classes
built from small configs (no downloads) and on a CNN; the saved configuration records every
transform, map, option and shape; every load failure raises a typed error with a pinned
message and leaves the model exactly as it was; nothing is ever unpickled; saves are atomic.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers
from safetensors import safe_open
from torch import nn

import weightcond as wc
import weightcond.io as wio

from helpers import PRESET_NAMES, randomize

transformers.logging.set_verbosity_error()

CONFIG, TENSORS = wio.CONFIG_NAME, wio.TENSORS_NAME
IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
QUERY = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # the models are tiny: on a busy machine intra-op threads only wait for each other
    # (about 10x slower here); restored for the other test modules
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- models -----------------------------------------------------------------------------------
class CNN(nn.Module):
    """Two convolutions and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((-2, -1)))


def _build(kind: str, hidden: int = 32) -> nn.Module:
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, vocab_size=100))
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
            eos_token_id=0))
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=64))
    assert kind == "cnn"
    return CNN()


@functools.cache
def _base_state(kind: str, hidden: int = 32) -> dict[str, torch.Tensor]:
    """The "pretrained" weights: a state dict saved before any conditioning."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in _build(kind, hidden).state_dict().items()}


def base(kind: str, *, hidden: int = 32, dtype: torch.dtype = torch.float32,
         seed: int = 1) -> nn.Module:
    """A freshly loaded base model: built with another initialisation, then given the base
    weights from the saved state dict."""
    torch.manual_seed(seed)
    model = _build(kind, hidden)
    model.load_state_dict(_base_state(kind, hidden))
    return model.to(dtype).eval()


def inputs(kind: str) -> torch.Tensor:
    return IMAGES if kind == "cnn" else IDS


@torch.no_grad()
def output(model: nn.Module, kind: str) -> torch.Tensor:
    out = model(inputs(kind))
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


TARGETS: dict[str, Any] = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_proj"],
                           "llama": "all-linear", "cnn": ["conv1", "conv2"]}


def condition(model: nn.Module, kind: str, preset: str, **options: Any) -> wc.ConditionReport:
    if wc.PRESETS[preset].update:
        options.setdefault("rank", 2)
    return wc.condition(model, preset, target_modules=TARGETS[kind], **options)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` in ``model.state_dict()``, with the name blanked."""
    tag = f".adapters.{name}."
    return {k.replace(tag, ".adapters.*."): v for k, v in model.state_dict().items() if tag in k}


def assert_same_adapter(saved: nn.Module, saved_name: str, loaded: nn.Module,
                        loaded_name: str) -> None:
    expected, got = adapter_state(saved, saved_name), adapter_state(loaded, loaded_name)
    assert expected and expected.keys() == got.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # as after condition(): only the loaded adapter trains
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(f".adapters.{loaded_name}." in n for n in trainable)


def round_trip(kind: str, preset: str, tmp_path: Path, *, dtype: torch.dtype = torch.float32,
               **options: Any) -> tuple[nn.Module, nn.Module]:
    model = base(kind, dtype=dtype)
    condition(model, kind, preset, **options)
    randomize(model)
    expected = output(model, kind)
    with wc.disabled(model):
        assert not torch.equal(expected, output(model, kind))  # not at the identity
    folder = wc.save_adapter(model, tmp_path / "adapter")
    fresh = base(kind, dtype=dtype, seed=2)
    assert wc.load_adapter(fresh, folder) == "default"
    assert torch.equal(output(fresh, kind), expected)
    assert_same_adapter(model, "default", fresh, "default")
    assert [n for n, _ in wc.conditioned_layers(fresh)] == \
        [n for n, _ in wc.conditioned_layers(model)]
    return model, fresh


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_round_trips_bit_exactly_on_bert(preset: str, tmp_path: Path) -> None:
    round_trip("bert", preset, tmp_path)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("kind", ["gpt2", "llama", "cnn"])
def test_every_preset_round_trips_on_gpt2_llama_and_a_cnn(kind: str, preset: str,
                                                            tmp_path: Path) -> None:
    round_trip(kind, preset, tmp_path)


@pytest.mark.parametrize("preset", ["lora", "dora", "sora", "oft", "boft", "hra"])
def test_bf16_round_trips_bit_exactly(preset: str, tmp_path: Path) -> None:
    round_trip("bert", preset, tmp_path, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert {r["dtype"] for r in config["layers"].values()} == {"bfloat16"}
    with safe_open(tmp_path / "adapter" / TENSORS, framework="pt") as f:
        keys = f.keys()
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}


@pytest.mark.parametrize("rotation_map", ["cayley", "exp", "first_order"])
def test_sora_keeps_its_rotation(rotation_map: str, tmp_path: Path) -> None:
    # the released SORA code reloads its rotation as the identity
    _, fresh = round_trip("bert", "sora", tmp_path, map=rotation_map, condition_bias=True)
    skews = [c.transform for _, layer in wc.conditioned_layers(fresh)
             for c in wc.conditioners(layer) if c.transform.name == "skew"]
    assert len(skews) == 4
    for q in skews:
        assert q.map == rotation_map and q.temperature
        assert q.C.abs().min() > 0 and q.D.abs().min() > 0
        assert not torch.equal(q.C, q.D)  # S = t(DCᵀ − CDᵀ) ≠ 0
        eye = torch.eye(q.dim)
        assert torch.dist(q.matrix().float(), eye) > 1e-2
    assert all(c.condition_bias for _, layer in wc.conditioned_layers(fresh)
               for c in wc.conditioners(layer) if c.side == "left")


def test_overrides_round_trip_with_their_own_ranks_presets_and_options(tmp_path: Path) -> None:
    model = base("bert")
    report = wc.condition(model, "sora", target_modules=["query", "key", "value"], rank=4,
                          overrides={"value": {"rank": 2, "rotation_rank": 2, "map": "exp"},
                                     "encoder.layer.0.attention.self.key":
                                         {"preset": "dora", "rank": 3}})
    assert set(report.layers.values()) == {"sora", "dora"}
    randomize(model)
    expected = output(model, "bert")
    wc.save_adapter(model, tmp_path / "a")
    fresh = base("bert", seed=2)
    wc.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(output(fresh, "bert"), expected)
    assert_same_adapter(model, "default", fresh, "default")
    for prefix, key in [("encoder.layer.0", (3, ["magnitude"])),
                        ("encoder.layer.1", (4, ["diag", "skew"]))]:
        attention = fresh.get_submodule(f"{prefix}.attention.self")
        assert [wc.get_update(attention.get_submodule(n)).rank
                for n in ("query", "key", "value")] == [4, key[0], 2]
        assert [c.transform.name for c in wc.conditioners(attention.key)] == key[1]
        skew = {n: c.transform for n in ("query", "value")
                for c in wc.conditioners(attention.get_submodule(n)) if c.transform.name == "skew"}
        assert (skew["query"].rank, skew["query"].map) == (4, "cayley")
        assert (skew["value"].rank, skew["value"].map) == (2, "exp")


def test_a_named_adapter_loads_under_its_name_or_another(tmp_path: Path) -> None:
    model = base("bert")
    condition(model, "bert", "sora", adapter_name="x")
    randomize(model)
    expected = output(model, "bert")
    wc.save_adapter(model, tmp_path / "x")
    assert json.loads((tmp_path / "x" / CONFIG).read_text())["adapter_name"] == "x"
    same, other = base("bert", seed=2), base("bert", seed=3)
    assert wc.load_adapter(same, tmp_path / "x") == "x"
    assert wc.load_adapter(other, tmp_path / "x", adapter_name="y") == "y"
    assert wc.adapter_names(same) == ["x"] and wc.adapter_names(other) == ["y"]
    assert torch.equal(output(same, "bert"), expected)
    assert torch.equal(output(other, "bert"), expected)
    assert_same_adapter(model, "x", other, "y")


def test_a_bare_layer_round_trips(tmp_path: Path) -> None:
    layer = nn.Linear(8, 6).requires_grad_(False)  # randomize moves the adapter only
    fresh = copy.deepcopy(layer)
    wc.apply_preset(layer, "sora", rank=2, rotation_rank=2)
    randomize(layer)
    x = torch.randn(3, 8)
    wc.save_adapter(layer, tmp_path / "a")
    wc.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), layer(x))


# -- the saved files --------------------------------------------------------------------------
def _refuse_constant(name: str) -> None:
    raise AssertionError(f"{CONFIG} holds {name}, which is not JSON")


def test_the_config_records_every_layer_transform_option_and_shape(tmp_path: Path) -> None:
    model = base("bert")
    wc.condition(model, "sora", target_modules=["query", "value"], rank=2, alpha=4,
                 rotation_rank=3, overrides={"value": {"map": "first_order"}})
    folder = wc.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, TENSORS]
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"),
                        parse_constant=_refuse_constant)
    assert config["format"] == "weightcond.adapter" and config["format_version"] == 3
    assert config["weightcond_version"] == wc.__version__
    assert config["adapter_name"] == "default" and config["model"] == "BertModel"
    names = [n for n, _ in wc.conditioned_layers(model)]
    assert list(config["layers"]) == names and len(names) == 4
    keys = set()
    for name, record in config["layers"].items():
        rotation_map = "first_order" if name.endswith("value") else "cayley"
        assert record == {
            "kind": "Linear", "shape": [32, 32], "dtype": "float32",
            "update": {"rank": 2, "alpha": 4.0},
            "conditioners": [
                {"placement": "pre", "side": "left", "transform": "diag", "options": {},
                 "condition_bias": False},
                {"placement": "post", "side": "left", "transform": "skew",
                 "options": {"rank": 3, "map": rotation_map, "temperature": True},
                 "condition_bias": False}],
            "tensors": ["post.0.transform.C", "post.0.transform.D",
                        "pre.0.transform.scale", "update.A", "update.B"]}
        keys |= {f"{name}.{t}" for t in record["tensors"]}
    assert config["tensors_sha256"] == wio._digest(read_tensors(folder))
    assert config["recipe_sha256"] == wio._recipe_digest(config)
    with safe_open(folder / TENSORS, framework="pt") as f:
        assert set(f.keys()) == keys
        assert f.metadata() == {"format": "pt"}
        assert tuple(f.get_tensor(f"{QUERY}.update.A").shape) == (2, 32)
        assert tuple(f.get_tensor(f"{QUERY}.post.0.transform.C").shape) == (32, 3)


@pytest.mark.parametrize(("kind", "layer", "shape"),
                         [("gpt2", "transformer.h.0.attn.c_attn", [96, 32]),
                          ("cnn", "conv1", [8, 36])])
def test_the_config_records_conv1d_and_conv2d_layers(kind: str, layer: str, shape: list[int],
                                                     tmp_path: Path) -> None:
    model = base(kind)
    condition(model, kind, "dora")
    wc.save_adapter(model, tmp_path / "a")
    record = json.loads((tmp_path / "a" / CONFIG).read_text())["layers"][layer]
    assert record["kind"] == {"gpt2": "Conv1D", "cnn": "Conv2d"}[kind]
    assert record["shape"] == shape
    assert record["conditioners"] == [
        {"placement": "post", "side": "left", "transform": "magnitude",
         "options": {"detach_norm": True, "eps": 1e-6}, "condition_bias": False}]


# -- load failures ----------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, Any]:
    layers = {n: (layer.parametrizations.weight[0].active, layer.parametrizations.weight[0].enabled)
              for n, layer in wc.conditioned_layers(model)}
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "classes": [(n, type(m).__name__) for n, m in model.named_modules()],
            "grads": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "adapters": wc.adapter_names(model), "layers": layers}


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for key in ("classes", "grads", "adapters", "layers"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A BERT sora adapter on query and value, away from the identity, and its output."""
    model = base("bert")
    condition(model, "bert", "sora")
    randomize(model)
    folder = wc.save_adapter(model, tmp_path_factory.mktemp("saved") / "sora")
    return folder, output(model, "bert")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # not load_file: its tensors map the file, and rewriting a mapped file is a bus error
    return safetensors.torch.load((folder / TENSORS).read_bytes())


def edit_config(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Edit the configuration and record its new recipe digest: a consistent file, so the
    checks behind the digest are what each case meets (tests/test_robustness_io.py edits
    without resealing)."""
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    if "recipe_sha256" in config:
        config["recipe_sha256"] = wio._recipe_digest(config)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Rewrite the tensors and record their digest: a consistent file that does not fit."""
    tensors = read_tensors(folder)
    change(tensors)
    safetensors.torch.save_file(tensors, folder / TENSORS)
    edit_config(folder, lambda c: c.update(tensors_sha256=wio._digest(tensors)))


def edit_layer(name: str, change: Callable[[dict[str, Any]], Any]
               ) -> Callable[[Path], None]:
    return lambda folder: edit_config(folder, lambda c: change(c["layers"][name]))


def edit_rotation(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return edit_layer(QUERY, lambda r: change(r["conditioners"][1]))


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(data)
    return mutate


def replace_text(old: str, new: str) -> Callable[[Path], None]:
    """Edit the configuration's text: what json.dumps cannot write (NaN as a number)."""
    def mutate(folder: Path) -> None:
        text = (folder / CONFIG).read_text()
        assert old in text
        (folder / CONFIG).write_text(text.replace(old, new, 1))
    return mutate


def cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep(len(data))])
    return mutate


def overwrite(start: int, data: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        old = bytearray((folder / TENSORS).read_bytes())
        old[start:start + len(data)] = data
        (folder / TENSORS).write_bytes(bytes(old))
    return mutate


class Detonator:
    """Unpickling it creates the directory it names, which the tests check does not exist."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def torch_pickle(folder: Path) -> None:
    state = read_tensors(folder)
    torch.save({**state, "payload": Detonator(str(folder.parent / "UNPICKLED"))},
               folder / TENSORS)


def raw_pickle(folder: Path) -> None:
    (folder / TENSORS).write_bytes(pickle.dumps(Detonator(str(folder.parent / "UNPICKLED"))))


def config_pickle(folder: Path) -> None:
    (folder / CONFIG).write_bytes(pickle.dumps(Detonator(str(folder.parent / "UNPICKLED"))))


def move_layer(old: str, new: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        def rename(tensors: dict[str, torch.Tensor]) -> None:
            for k in [k for k in tensors if k.startswith(old + ".")]:
                tensors[new + k[len(old):]] = tensors.pop(k)
        edit_tensors(folder, rename)
        edit_config(folder, lambda c: c["layers"].__setitem__(new, c["layers"].pop(old)))
    return mutate


PEFT_CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                          "target_modules": ["query", "value"], "task_type": None}).encode()
UNREADABLE = (r"load_adapter: weightcond_adapter\.safetensors is not a readable safetensors file "
              r"\(truncated, corrupted or another format\)")
MALFORMED = r"load_adapter: malformed weightcond_adapter\.json: "
A = f"{QUERY}.update.A"
AT = rf"load_adapter: layer '{QUERY}': "
bert_64 = functools.partial(base, "bert", hidden=64)

FAILURES: list[tuple[str, Callable[[Path], Any], str, type, str]] = [
    # (id, change to a copy of the saved adapter (or the path to load instead), target
    #  model, error, message regex)
    ("path-missing", lambda f: f.parent / "nowhere", "bert", wc.AdapterError,
     r"load_adapter: argument 'path' expected a saved adapter directory, got '.*nowhere', "
     r"which does not exist"),
    ("path-is-a-file", lambda f: f / TENSORS, "bert", wc.AdapterError,
     r"load_adapter: argument 'path' expected a saved adapter directory, got "
     r"'.*weightcond_adapter\.safetensors', which is a file"),
    ("config-missing", lambda f: (f / CONFIG).unlink(), "bert", wc.AdapterError,
     r"load_adapter: '.*' is not a saved adapter: weightcond_adapter\.json missing"),
    ("tensors-missing", lambda f: (f / TENSORS).unlink(), "bert", wc.AdapterError,
     r"is not a saved adapter: weightcond_adapter\.safetensors missing"),
    ("config-not-json", write(CONFIG, b'{"format": "weightcond.adapter",'), "bert",
     wc.AdapterError, r"load_adapter: weightcond_adapter\.json is not valid JSON \(Expecting"),
    ("config-is-a-pickle", config_pickle, "bert", wc.AdapterError,
     r"load_adapter: weightcond_adapter\.json is not valid JSON"),
    ("config-not-an-object", write(CONFIG, b"[1, 2]"), "bert", wc.AdapterError,
     MALFORMED + r"expected a JSON object"),
    ("peft-config", write(CONFIG, PEFT_CONFIG), "bert", wc.AdapterError,
     r"load_adapter: weightcond_adapter\.json expected format 'weightcond\.adapter', got None "
     r"\(a PEFT adapter\? use weightcond\.from_peft\)"),
    ("format-version-too-new",
     lambda f: edit_config(f, lambda c: c.update(format_version=4, weightcond_version="9.0")),
     "bert", wc.AdapterError,
     MALFORMED + r"format_version expected 1\.\.3, got 4 \(saved by weightcond '9\.0'; "
                 r"this is 0\.1\.0\)"),
    ("format-version-missing", lambda f: edit_config(f, lambda c: c.pop("format_version")),
     "bert", wc.AdapterError, MALFORMED + r"format_version expected 1\.\.3, got None"),
    ("adapter-name-type", lambda f: edit_config(f, lambda c: c.update(adapter_name=3)),
     "bert", wc.AdapterError,
     MALFORMED + r"'adapter_name' expected a name of letters, digits, '_' and '-', got 3"),
    ("adapter-name-invalid", lambda f: edit_config(f, lambda c: c.update(adapter_name="a.b")),
     "bert", wc.AdapterError, MALFORMED + r"'adapter_name' expected a name .*, got 'a\.b'"),
    ("digest-missing", lambda f: edit_config(f, lambda c: c.pop("tensors_sha256")), "bert",
     wc.AdapterError, MALFORMED + r"'tensors_sha256' expected a SHA-256 hex digest, got None"),
    ("layers-empty", lambda f: edit_config(f, lambda c: c.update(layers={})), "bert",
     wc.AdapterError, MALFORMED + r"'layers' expected a non-empty object"),
    ("layers-a-list", lambda f: edit_config(f, lambda c: c.update(layers=[QUERY])), "bert",
     wc.AdapterError, MALFORMED + r"'layers' expected a non-empty object"),
    ("layer-record-empty", edit_layer(QUERY, lambda r: r.clear()), "bert", wc.AdapterError,
     MALFORMED + rf"layer '{QUERY}': 'kind' expected a str"),
    ("shape-short", edit_layer(QUERY, lambda r: r.update(shape=[32])), "bert",
     wc.AdapterError, MALFORMED + rf"layer '{QUERY}': 'shape' expected \[out, in\]"),
    ("shape-strings", edit_layer(QUERY, lambda r: r.update(shape=["32", 32])), "bert",
     wc.AdapterError, MALFORMED + r"layer '.*': 'shape' expected \[out, in\]"),
    ("update-rank-string", edit_layer(QUERY, lambda r: r["update"].update(rank="2")), "bert",
     wc.AdapterError,
     MALFORMED + r"layer '.*': 'update' expected null or \{'rank': int, 'alpha': number\}"),
    ("conditioners-not-a-list", edit_layer(QUERY, lambda r: r.update(conditioners={})),
     "bert", wc.AdapterError, MALFORMED + r"layer '.*': 'conditioners' expected a list"),
    ("conditioner-without-side", edit_rotation(lambda c: c.pop("side")), "bert",
     wc.AdapterError, MALFORMED + r"layer '.*': conditioner 1 expected placement, side, "
                                  r"transform, options and condition_bias"),
    ("condition-bias-string", edit_rotation(lambda c: c.update(condition_bias="no")), "bert",
     wc.AdapterError, MALFORMED + r"layer '.*': conditioner 1 expected placement"),
    ("tensors-not-a-list", edit_layer(QUERY, lambda r: r.update(tensors="update.A")), "bert",
     wc.AdapterError, MALFORMED + r"layer '.*': 'tensors' expected a list of names"),
    ("tensors-truncated", cut(TENSORS, lambda n: n - 100), "bert", wc.AdapterError,
     UNREADABLE),
    ("tensors-header-only", cut(TENSORS, lambda n: 20), "bert", wc.AdapterError, UNREADABLE),
    ("tensors-empty", write(TENSORS, b""), "bert", wc.AdapterError, UNREADABLE),
    ("header-size-corrupted", overwrite(0, b"\xff" * 8), "bert", wc.AdapterError, UNREADABLE),
    ("header-json-corrupted", overwrite(8, b"#!garbage"), "bert", wc.AdapterError,
     UNREADABLE),
    ("data-corrupted", lambda f: overwrite((f / TENSORS).stat().st_size - 4, b"\x7f" * 4)(f),
     "bert", wc.AdapterError,
     r"load_adapter: weightcond_adapter\.safetensors does not match the SHA-256 recorded in "
     r"weightcond_adapter\.json \(corrupted, or not the file saved with it\)"),
    ("tensors-from-another-save",
     lambda f: edit_config(f, lambda c: c.update(tensors_sha256="0" * 64)), "bert",
     wc.AdapterError, r"does not match the SHA-256 recorded in weightcond_adapter\.json"),
    ("torch-pickle", torch_pickle, "bert", wc.AdapterError, UNREADABLE),
    ("raw-pickle", raw_pickle, "bert", wc.AdapterError, UNREADABLE),
    ("other-architecture", lambda f: None, "gpt2", wc.AdapterError,
     r"load_adapter: the adapter conditions layers the model does not have: "
     rf"'{QUERY}', .* \(an adapter for another model\?\)"),
    ("other-hidden-size", lambda f: None, "bert-64", wc.AdapterError,
     rf"load_adapter: layer '{QUERY}' expected a Linear of shape \(out, in\) = \(32, 32\), "
     r"got a Linear of shape \(64, 64\) \(an adapter for another model\?\)"),
    ("other-layer-kind", edit_layer(QUERY, lambda r: r.update(kind="Conv1D")), "bert",
     wc.AdapterError, rf"layer '{QUERY}' expected a Conv1D of shape \(out, in\) = \(32, 32\), "
                      r"got a Linear of shape \(32, 32\)"),
    ("unsupported-layer", move_layer(QUERY, "embeddings.word_embeddings"), "bert",
     wc.AdapterError,
     r"load_adapter: layer 'embeddings\.word_embeddings' expected a Linear of shape \(out, "
     r"in\) = \(32, 32\), got an Embedding of shape \(32, 100\)"),
    ("missing-tensor", lambda f: edit_tensors(f, lambda t: t.pop(A)), "bert", wc.AdapterError,
     r"load_adapter: weightcond_adapter\.safetensors does not match weightcond_adapter\.json: "
     rf"missing \['{A}'\], extra none"),
    ("extra-tensor", lambda f: edit_tensors(f, lambda t: t.update({A + "2": t[A].clone()})), "bert",
     wc.AdapterError, rf"missing none, extra \['{A}2'\]"),
    ("wrong-shape", lambda f: edit_tensors(f, lambda t: t.update({A: torch.zeros(3, 32)})),
     "bert", wc.AdapterError,
     rf"load_adapter: tensor '{A}' expected shape \(2, 32\), got \(3, 32\)"),
    ("other-transform", edit_rotation(lambda c: c.update(transform="diag", options={})),
     "bert", wc.AdapterError,
     AT + r"the rebuilt adapter has tensors \['post\.0\.transform\.scale', .*\], the "
          r"configuration lists \['post\.0\.transform\.C', 'post\.0\.transform\.D', .*\]"),
    ("unknown-transform", edit_rotation(lambda c: c.update(transform="rotation")), "bert",
     wc.AdapterError, AT + r"argument 'transform' expected one of 'block', .*, got 'rotation'"),
    ("unknown-option", edit_rotation(lambda c: c["options"].update(angle=0.1)), "bert",
     wc.AdapterError, AT + r"unknown option 'angle' for transform 'skew'; expected one of "
                           r"'rank', 'map', 'temperature'"),
    ("option-of-no-options", edit_layer(QUERY, lambda r: r["conditioners"][0]["options"]
                                        .update(rank=2)), "bert", wc.AdapterError,
     AT + r"unknown option 'rank' for transform 'diag', which takes no options"),
    ("unknown-map", edit_rotation(lambda c: c["options"].update(map="cayly")), "bert",
     wc.AdapterError,
     AT + r"skew: argument 'map' expected one of 'cayley', 'exp', 'first_order', got 'cayly'"),
    ("rotation-rank-too-large", edit_rotation(lambda c: c["options"].update(rank=33)), "bert",
     wc.AdapterError, AT + r"skew: argument 'rank' expected an int <= 32"),
    ("update-rank-too-large", edit_layer(QUERY, lambda r: r["update"].update(rank=33)), "bert",
     wc.AdapterError, AT + r"argument 'rank' expected an int <= 32"),
    ("alpha-nan", replace_text('"alpha": 2.0', '"alpha": NaN'), "bert", wc.AdapterError,
     MALFORMED + r"NaN is not a JSON number"),
    ("alpha-negative", edit_layer(QUERY, lambda r: r["update"].update(alpha=-1.0)), "bert",
     wc.AdapterError, AT + r"argument 'alpha' expected a finite number > 0, got -1\.0"),
    ("placement", edit_rotation(lambda c: c.update(placement="middle")), "bert",
     wc.AdapterError, AT + r"argument 'placement' expected one of 'pre', 'post', got 'middle'"),
    ("condition-bias-on-the-right",
     edit_rotation(lambda c: c.update(side="right", condition_bias=True)), "bert",
     wc.AdapterError, AT + r"argument 'condition_bias' expected False for side='right'"),
]


@pytest.fixture(scope="module")
def targets() -> dict[str, nn.Module]:
    """Pristine targets, copied for each case."""
    return {"bert": base("bert"), "gpt2": base("gpt2"), "bert-64": bert_64()}


def target(targets: dict[str, nn.Module], name: str, with_other: bool) -> nn.Module:
    model = copy.deepcopy(targets[name])
    if with_other:  # another adapter, away from the identity, that must survive the failure
        wc.condition(model, "lora", target_modules="all-linear", adapter_name="other", rank=2)
        randomize(model, seed=5)
    return model


@pytest.mark.parametrize("with_other", [False, True], ids=["plain", "with-other-adapter"])
@pytest.mark.parametrize("case", FAILURES, ids=[c[0] for c in FAILURES])
def test_a_failed_load_raises_and_leaves_the_model_as_it_was(
        case: tuple, with_other: bool, saved: tuple[Path, torch.Tensor],
        targets: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, mutate, name, error, pattern = case
    folder = tmp_path / "adapter"
    shutil.copytree(saved[0], folder)
    path = mutate(folder) or folder
    model = target(targets, name, with_other)
    before = snapshot(model)

    def unpickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_adapter unpickled something")

    for module, attribute in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, attribute, unpickle)
    with pytest.raises(error, match=pattern):
        wc.load_adapter(model, path)
    assert_unchanged(model, before)
    assert not (tmp_path / "UNPICKLED").exists()


def test_the_unpickling_canary_works(tmp_path: Path) -> None:
    """The pickles above do run code when unpickled: the checks on them mean something."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    raw_pickle(folder)
    pickle.loads((folder / TENSORS).read_bytes())
    assert (tmp_path / "UNPICKLED").is_dir()


def test_a_name_collision_is_a_state_error_and_changes_nothing(
        saved: tuple[Path, torch.Tensor], targets: dict[str, nn.Module]) -> None:
    model = copy.deepcopy(targets["bert"])
    wc.condition(model, "lora", target_modules=["query"], rank=2)  # adapter 'default'
    randomize(model, seed=5)
    before = snapshot(model)
    with pytest.raises(wc.StateError,
                       match=r"load_adapter: argument 'adapter_name' expected a new adapter, got "
                             rf"'default', which layer '{QUERY}' already has; pass another "
                             r"name"):
        wc.load_adapter(model, saved[0])
    assert_unchanged(model, before)
    with pytest.raises(wc.OptionError, match=r"load_adapter: argument 'adapter_name' expected a "
                                             r"name of letters"):
        wc.load_adapter(model, saved[0], adapter_name="a b")
    assert_unchanged(model, before)


def test_loading_beside_another_adapter_keeps_it_intact_and_inactive(
        saved: tuple[Path, torch.Tensor], targets: dict[str, nn.Module]) -> None:
    folder, expected = saved
    model = target(targets, "bert", with_other=True)
    other = output(model, "bert")
    other_state = {k: v.clone() for k, v in adapter_state(model, "other").items()}
    assert wc.load_adapter(model, folder) == "default"
    assert wc.adapter_names(model) == ["default", "other"]
    for _, layer in wc.conditioned_layers(model):  # the loaded adapter is the model's active
        adapters = layer.parametrizations.weight[0]
        assert adapters.active == ("default" if "default" in adapters.adapters else None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert all(torch.equal(v, other_state[k]) for k, v in adapter_state(model, "other").items())
    wc.set_adapter(model, "default")
    assert torch.equal(output(model, "bert"), expected)
    wc.set_adapter(model, "other")
    assert torch.equal(output(model, "bert"), other)


# -- atomic saves -----------------------------------------------------------------------------
@pytest.fixture
def sora_bert() -> nn.Module:
    model = base("bert")
    condition(model, "bert", "sora")
    randomize(model)
    return model


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def half_written_save_file(tensors: dict[str, torch.Tensor], filename: Any, **kwargs: Any
                           ) -> None:
    Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a")
    raise OSError("No space left on device")


def half_written_json_dump(obj: Any, f: Any, **kwargs: Any) -> None:
    f.write('{"format": "weightcond.')
    raise OSError("No space left on device")


FAILING_WRITES = [(safetensors.torch, "save_file", half_written_save_file),
                  (json, "dump", half_written_json_dump)]


@pytest.mark.parametrize("failing", FAILING_WRITES, ids=["save_file", "json.dump"])
def test_a_failed_save_writes_nothing(failing: tuple, sora_bert: nn.Module, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(*failing)
    with pytest.raises(OSError, match="No space left on device"):
        wc.save_adapter(sora_bert, tmp_path / "adapter")
    assert entries(tmp_path) == []


@pytest.mark.parametrize("failing", FAILING_WRITES, ids=["save_file", "json.dump"])
def test_a_failed_overwrite_keeps_the_old_adapter(failing: tuple, sora_bert: nn.Module,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    expected = output(sora_bert, "bert")
    folder = wc.save_adapter(sora_bert, tmp_path / "adapter")
    old = {name: (folder / name).read_bytes() for name in (CONFIG, TENSORS)}
    randomize(sora_bert, seed=7)
    with monkeypatch.context() as patch:
        patch.setattr(*failing)
        with pytest.raises(OSError):
            wc.save_adapter(sora_bert, folder)
    assert entries(tmp_path) == ["adapter"]
    assert {name: (folder / name).read_bytes() for name in (CONFIG, TENSORS)} == old
    fresh = base("bert", seed=2)
    wc.load_adapter(fresh, folder)
    assert torch.equal(output(fresh, "bert"), expected)


def test_a_failed_rename_puts_the_old_adapter_back(sora_bert: nn.Module, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = wc.save_adapter(sora_bert, tmp_path / "adapter")
    old = (folder / TENSORS).read_bytes()
    replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if str(src).endswith(".partial"):
            raise OSError("rename failed")
        replace(src, dst)

    randomize(sora_bert, seed=7)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        wc.save_adapter(sora_bert, folder)
    assert entries(tmp_path) == ["adapter"] and (folder / TENSORS).read_bytes() == old


def test_a_successful_overwrite_replaces_the_adapter(sora_bert: nn.Module,
                                                     tmp_path: Path) -> None:
    folder = wc.save_adapter(sora_bert, tmp_path / "adapter")
    randomize(sora_bert, seed=7)
    expected = output(sora_bert, "bert")
    assert wc.save_adapter(sora_bert, folder) == folder
    assert entries(tmp_path) == ["adapter"] and entries(folder) == [CONFIG, TENSORS]
    fresh = base("bert", seed=2)
    wc.load_adapter(fresh, folder)
    assert torch.equal(output(fresh, "bert"), expected)


def test_the_adapter_directory_gets_the_users_permissions(sora_bert: nn.Module,
                                                          tmp_path: Path) -> None:
    # not the 0o700 of a temporary directory
    (tmp_path / "plain").mkdir()
    folder = wc.save_adapter(sora_bert, tmp_path / "adapter")
    assert folder.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.parametrize("existing", ["other-files", "a-file"])
def test_saving_over_something_else_is_refused_and_deletes_nothing(
        existing: str, sora_bert: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    if existing == "a-file":
        path.write_text("notes")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("notes")
        (path / CONFIG).write_text("{}")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                    for p in tmp_path.rglob("*"))
    with pytest.raises(wc.AdapterError,
                       match=r"save_adapter: argument 'path' expected a new directory or a "
                             r"saved adapter to replace, got '.*adapter', which holds other "
                             r"files"):
        wc.save_adapter(sora_bert, path)
    assert sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                  for p in tmp_path.rglob("*")) == before


class MyDiag(wc.TRANSFORMS["diag"]):
    """A subclass that is not registered: its name is not its own."""


UNSAVEABLE = [
    ("object", lambda layer: wc.register_conditioning(layer, transform=wc.TRANSFORMS["diag"](8)),
     r"save_adapter: layer '0': conditioner 0 \(Diag\) was registered as a transform object "
     r"or an unregistered class, so its options are unknown; register the class with "
     r"weightcond\.register_transform"),
    ("unregistered-class", lambda layer: wc.register_conditioning(layer, transform=MyDiag),
     r"save_adapter: layer '0': conditioner 0 \(MyDiag\) was registered as a transform object"),
    ("callable-map", lambda layer: wc.register_conditioning(
        layer, side="right", transform="block", block_size=4, map=torch.linalg.matrix_exp),
     r"save_adapter: option 'map' of layer '0' is a builtin_function_or_method .*; a saved "
     r"adapter stores options that are numbers, strings, booleans, None or lists of them"),
]


@pytest.mark.parametrize("case", UNSAVEABLE, ids=[c[0] for c in UNSAVEABLE])
def test_an_adapter_that_cannot_be_rebuilt_is_not_saved(case: tuple, tmp_path: Path) -> None:
    _, register, pattern = case
    model = nn.Sequential(nn.Linear(8, 8))
    wc.register_update(model[0], rank=2)
    register(model[0])
    with pytest.raises(wc.AdapterError, match=pattern):
        wc.save_adapter(model, tmp_path / "adapter")
    assert entries(tmp_path) == []


def test_saving_needs_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(wc.AdapterError, match=r"save_adapter: argument 'model' expected a model "
                                              r"with conditioned layers, got none in BertModel"):
        wc.save_adapter(base("bert"), tmp_path / "a")
    model = base("bert")
    condition(model, "bert", "lora")
    with pytest.raises(wc.AdapterError, match=r"save_adapter: argument 'adapter_name' expected "
                                              r"one of 'default', got 'x'"):
        wc.save_adapter(model, tmp_path / "a", adapter_name="x")
    assert entries(tmp_path) == []


# -- which adapter is saved -------------------------------------------------------------------
def test_the_adapter_asked_for_is_saved(tmp_path: Path) -> None:
    model = base("bert")
    wc.condition(model, "lora", target_modules=["query", "value"], rank=2, adapter_name="a")
    randomize(model, seed=1)  # only the newest adapter is trainable
    wc.condition(model, "sora", target_modules=["query", "key"], rank=2, adapter_name="b")
    randomize(model, seed=2)
    outputs = {}
    for name in ("a", "b"):
        wc.set_adapter(model, name)
        outputs[name] = output(model, "bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def check(folder: Path, name: str) -> None:
        config = json.loads((folder / CONFIG).read_text())
        assert config["adapter_name"] == name
        transforms = {t["transform"] for r in config["layers"].values()
                      for t in r["conditioners"]}
        assert transforms == ({"diag", "skew"} if name == "b" else set())
        fresh = base("bert", seed=2)
        assert wc.load_adapter(fresh, folder) == name
        assert torch.equal(output(fresh, "bert"), outputs[name])

    wc.set_adapter(model, "a")  # the active one
    check(wc.save_adapter(model, tmp_path / "active-a"), "a")
    check(wc.save_adapter(model, tmp_path / "named-b", adapter_name="b"), "b")
    wc.set_adapter(model, "b")
    with wc.disabled(model):  # disabled is not a different adapter: the active one is saved
        check(wc.save_adapter(model, tmp_path / "disabled-b"), "b")
        check(wc.save_adapter(model, tmp_path / "disabled-a", adapter_name="a"), "a")
    # saving changes nothing in the model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [layer.parametrizations.weight[0].active
            for _, layer in wc.conditioned_layers(model)] == ["b", "b", None, "b", "b", None]
