"""Adversarial adapter files and arguments (issue 19).

Every case fails with a typed weightcond error that names what was wrong — never a bare
``RecursionError``, ``TypeError`` or ``re.error`` from deep inside, never a silent cast or a
silently different function — and leaves the model as it was. Covered: malformed JSON,
argument types, the save destination, the recipe digest (each field that determines the
function is covered), tensor dtypes and values, configuration field types and ranges, and
the same for PEFT directories (:func:`weightcond.from_peft`) and PEFT tensors
(:func:`weightcond.interop.from_peft_tensors`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import weightcond as wc
import weightcond.io as wio

from helpers import randomize

CONFIG, TENSORS = wio.CONFIG_NAME, wio.TENSORS_NAME
PEFT_CONFIG_FILE, PEFT_TENSORS_FILE = wio.PEFT_CONFIG_NAME, wio.PEFT_TENSORS_NAME
MALFORMED = r"load_adapter: malformed weightcond_adapter\.json: "
INTEGRITY = (r"load_adapter: weightcond_adapter\.json does not match the SHA-256 of its recipe "
             r"recorded in it \('recipe_sha256'\)")
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
A = "fc1.update.A"


class Net(nn.Module):
    """Two square linear layers with biases: swapping a conditioner's side keeps every
    tensor's shape, so only the recipe tells the two apart."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def net(dtype: torch.dtype = torch.float32) -> Net:
    """A freshly loaded base model: the same base weights every time."""
    torch.manual_seed(0)
    return Net().to(dtype).eval()


def conditioned(preset: str = "sora", **options: Any) -> Net:
    model = net()
    wc.condition(model, preset, target_modules=["fc1", "fc2"], rank=2, alpha=4, **options)
    randomize(model)
    return model


def two_rotations() -> Net:
    """``fc1`` with two skew rotations in one stage, differing only in their map: their order
    is part of the function, and swapping them keeps every tensor name and shape."""
    model = net()
    for rotation_map in ("cayley", "exp"):
        wc.register_conditioning(model.fc1, placement="post", side="left", transform="skew",
                                 rank=2, map=rotation_map)
    randomize(model)
    return model


@torch.no_grad()
def output(model: nn.Module) -> torch.Tensor:
    return model(X)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A sora adapter on both layers, away from the identity, and its output."""
    model = conditioned()
    return wc.save_adapter(model, tmp_path / "adapter"), output(model)


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG).read_text())  # type: ignore[no-any-return]


def write_config(folder: Path, config: dict[str, Any], *, seal: bool) -> None:
    """Write ``config``; ``seal``: record its recipe digest, as a consistent file (one that
    was saved so, or edited and resealed by someone who meant it) has it."""
    if seal:
        config["recipe_sha256"] = wio._recipe_digest(config)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_config(folder: Path, change: Callable[[dict[str, Any]], Any], *, seal: bool) -> None:
    config = read_config(folder)
    change(config)
    write_config(folder, config, seal=seal)


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Rewrite the tensors with their digest recorded and sealed: consistent, but wrong."""
    tensors = safetensors.torch.load((folder / TENSORS).read_bytes())
    change(tensors)
    safetensors.torch.save_file(tensors, folder / TENSORS)
    edit_config(folder, lambda c: c.update(tensors_sha256=wio._digest(tensors)), seal=True)


def assert_load_fails(folder: Path, error: type[Exception], pattern: str,
                      model: nn.Module | None = None) -> None:
    model = net() if model is None else model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=pattern):
        wc.load_adapter(model, folder)
    assert not wc.conditioned_layers(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


def entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- JSON that is not a configuration ---------------------------------------------------------
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


JSON_TEXTS = [
    # (id, change to the saved config text, message)
    ("nested-100000", lambda text: nested(100_000), MALFORMED + r"nested more than 64 levels"),
    ("nested-in-a-value", lambda text: text.replace('"map": "cayley"',
                                                    f'"map": {nested(100)}', 1),
     MALFORMED + r"nested more than 64 levels"),
    ("number-out-of-range", lambda text: text.replace('"alpha": 4.0', '"alpha": 1e400', 1),
     MALFORMED + r"the number 1e400 is out of range"),
    ("nan", lambda text: text.replace('"alpha": 4.0', '"alpha": NaN', 1),
     MALFORMED + r"NaN is not a JSON number"),
    ("infinity", lambda text: text.replace('"alpha": 4.0', '"alpha": -Infinity', 1),
     MALFORMED + r"-Infinity is not a JSON number"),
    ("huge-integer", lambda text: text.replace('"rank": 2', '"rank": ' + "9" * 5000, 1),
     MALFORMED + r"the integer 999999999999… has 5000 digits"),
    ("duplicate-key", lambda text: text.replace('{', '{"adapter_name": "other", ', 1),
     MALFORMED + r"the key 'adapter_name' appears twice in one object"),
]


@pytest.mark.parametrize("case", JSON_TEXTS, ids=[c[0] for c in JSON_TEXTS])
def test_json_that_cannot_be_a_configuration_is_malformed(case: tuple, saved: tuple) -> None:
    _, change, pattern = case
    folder = saved[0]
    text = (folder / CONFIG).read_text()
    changed = change(text)
    assert changed != text
    (folder / CONFIG).write_text(changed)
    assert_load_fails(folder, wc.AdapterError, pattern)


# -- arguments --------------------------------------------------------------------------------
CALLS = ["save_adapter", "load_adapter", "to_peft", "from_peft"]
BAD_PATHS = [
    (None, r"argument 'path' expected a str or os\.PathLike, got NoneType"),
    (3, r"argument 'path' expected a str or os\.PathLike, got int"),
    (b"adapter", r"argument 'path' expected a str or os\.PathLike, got bytes"),
    ("", r"argument 'path' expected a non-empty path, got ''"),
    ("ad\0apter", r"argument 'path' expected a path without NUL characters, got 'ad\\x00apter'"),
]


def call(name: str, model: Any, path: Any, **kwargs: Any) -> Any:
    function = {"save_adapter": wc.save_adapter, "load_adapter": wc.load_adapter,
                "to_peft": wc.to_peft, "from_peft": wc.from_peft}[name]
    return function(model, path, **kwargs)


def lora() -> Net:
    return conditioned("lora")


@pytest.mark.parametrize(("path", "pattern"), BAD_PATHS, ids=["None", "int", "bytes", "empty",
                                                              "nul"])
@pytest.mark.parametrize("name", CALLS)
def test_a_path_that_is_not_a_path_is_refused(name: str, path: Any, pattern: str,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.chdir(tmp_path)
    model = lora() if name in ("save_adapter", "to_peft") else net()
    with pytest.raises(wc.AdapterError, match=rf"{name}: {pattern}"):
        call(name, model, path)
    assert entries(tmp_path) == []


@pytest.mark.parametrize("model", [None, "model", nn.Linear], ids=["None", "str", "class"])
@pytest.mark.parametrize("name", CALLS)
def test_a_model_that_is_not_a_module_is_refused(name: str, model: Any,
                                                 saved: tuple[Path, torch.Tensor]) -> None:
    got = type(model).__name__
    with pytest.raises(wc.LayerTypeError, match=rf"{name}: argument 'model' expected an "
                                                rf"nn\.Module, got {got}"):
        call(name, model, saved[0])


@pytest.mark.parametrize("path", [".", ".."])
@pytest.mark.parametrize("name", ["save_adapter", "to_peft"])
def test_saving_to_a_path_without_a_directory_name_is_refused(name: str, path: str,
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    # an empty current directory passed as "." looked like a new directory: the save tried
    # to rename the working directory away (and would have deleted it)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(wc.AdapterError, match=rf"{name}: argument 'path' expected a path ending "
                                              rf"in a directory name, got '{re.escape(path)}'"):
        call(name, lora(), path)
    assert entries(tmp_path) == ["cwd"]


@pytest.mark.parametrize("name", ["save_adapter", "to_peft"])
def test_an_adapter_name_that_is_not_a_name_is_refused_on_save(name: str,
                                                               tmp_path: Path) -> None:
    with pytest.raises(wc.OptionError, match=rf"{name}: argument 'adapter_name' expected a name "
                                             r"of letters, .*, got \['default'\]"):
        call(name, lora(), tmp_path / "a", adapter_name=["default"])
    assert entries(tmp_path) == []


# -- where a save goes ------------------------------------------------------------------------
@pytest.mark.parametrize("below", ["adapter", "sub/adapter"], ids=["parent", "ancestor"])
@pytest.mark.parametrize("name", ["save_adapter", "to_peft"])
def test_saving_under_a_file_is_refused_and_leaves_nothing(name: str, below: str,
                                                           tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("notes")
    relation = "parent" if below == "adapter" else "ancestor"
    with pytest.raises(wc.AdapterError, match=rf"{name}: argument 'path' expected a path whose "
                                              rf"parent is a directory, got '.*{below}', but "
                                              rf"its {relation} '.*notes\.txt' is a file"):
        call(name, lora(), tmp_path / "notes.txt" / below)
    assert entries(tmp_path) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "notes"


def test_saving_through_a_link_replaces_the_adapter_it_points_to(tmp_path: Path) -> None:
    first, second = conditioned(), conditioned()
    randomize(second, seed=9)
    wc.save_adapter(first, tmp_path / "real")
    (tmp_path / "link").symlink_to("real", target_is_directory=True)
    assert wc.save_adapter(second, tmp_path / "link") == tmp_path / "link"
    assert entries(tmp_path) == ["link", "real", f"real/{CONFIG}", f"real/{TENSORS}"]
    assert (tmp_path / "link").is_symlink()
    fresh = net()
    wc.load_adapter(fresh, tmp_path / "link")
    assert torch.equal(output(fresh), output(second))


# -- the recipe digest ------------------------------------------------------------------------
def conditioner(layer: str, i: int, change: Callable[[dict[str, Any]], Any]
                ) -> Callable[[dict[str, Any]], Any]:
    return lambda config: change(config["layers"][layer]["conditioners"][i])


TAMPERS: list[tuple[str, Callable[[], Net], Callable[[dict[str, Any]], Any]]] = [
    # (id, model, change to the saved config) — each keeps every tensor's name and shape
    ("map", conditioned, conditioner("fc1", 1, lambda c: c["options"].update(map="exp"))),
    ("temperature", conditioned,
     conditioner("fc1", 1, lambda c: c["options"].update(temperature=False))),
    ("alpha", conditioned, lambda c: c["layers"]["fc1"]["update"].update(alpha=8.0)),
    ("side", conditioned, conditioner("fc1", 0, lambda c: c.update(side="right"))),
    ("condition_bias", conditioned,
     conditioner("fc2", 1, lambda c: c.update(condition_bias=True))),
    ("order", two_rotations,
     lambda c: c["layers"]["fc1"]["conditioners"].reverse()),
    ("layers-swapped", lambda: conditioned(overrides={"fc2": {"map": "exp"}}),
     lambda c: c.update(layers={"fc1": c["layers"]["fc2"], "fc2": c["layers"]["fc1"]})),
]


PLACEMENT = ("placement", conditioned,
             conditioner("fc1", 0, lambda c: c.update(placement="post")))


@pytest.mark.parametrize("case", [*TAMPERS, PLACEMENT], ids=[c[0] for c in [*TAMPERS, PLACEMENT]])
def test_a_recipe_edited_after_saving_fails_the_integrity_check(case: tuple,
                                                                tmp_path: Path) -> None:
    _, build, change = case
    folder = wc.save_adapter(build(), tmp_path / "adapter")
    config = read_config(folder)
    change(config)
    assert config != read_config(folder)
    write_config(folder, config, seal=False)
    assert_load_fails(folder, wc.AdapterError, INTEGRITY + r": edited after it was saved, or "
                                                           r"corrupted")


@pytest.mark.parametrize("case", TAMPERS, ids=[c[0] for c in TAMPERS])
def test_each_covered_field_changes_the_function(case: tuple, tmp_path: Path) -> None:
    """The tampers above are not cosmetic: resealed, each loads and computes another function
    (so without the digest each would load silently wrong)."""
    _, build, change = case
    model = build()
    folder = wc.save_adapter(model, tmp_path / "adapter")
    edit_config(folder, change, seal=True)
    fresh = net()
    wc.load_adapter(fresh, folder)
    assert not torch.allclose(output(fresh), output(model))


@pytest.mark.parametrize("field", ["weightcond_version", "model", "adapter_name"])
def test_the_digest_covers_the_whole_configuration(field: str,
                                                   saved: tuple[Path, torch.Tensor]) -> None:
    folder = saved[0]
    edit_config(folder, lambda c: c.update({field: "other"}), seal=False)
    assert_load_fails(folder, wc.AdapterError, INTEGRITY)


def test_the_saved_digest_is_of_the_canonical_configuration(
        saved: tuple[Path, torch.Tensor]) -> None:
    config = read_config(saved[0])
    assert config["format_version"] == 3
    rest = {k: v for k, v in config.items() if k != "recipe_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert config["recipe_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    # the key order on disk is not part of it: a reformatted file still loads
    (saved[0] / CONFIG).write_text(json.dumps(dict(reversed(config.items())), indent=7))
    fresh = net()
    wc.load_adapter(fresh, saved[0])
    assert torch.equal(output(fresh), saved[1])


def as_format_1(config: dict[str, Any]) -> None:
    """What weightcond wrote before the recipe digest: format 1, tensors digest only."""
    del config["recipe_sha256"], config["modules"]
    config["format_version"] = 1


def as_format_2(config: dict[str, Any]) -> None:
    """What weightcond wrote before modules to save: format 2 (to be resealed)."""
    del config["modules"]
    config["format_version"] = 2


def test_a_format_2_adapter_still_loads(saved: tuple[Path, torch.Tensor]) -> None:
    folder, expected = saved
    edit_config(folder, as_format_2, seal=True)
    fresh = net()
    assert wc.load_adapter(fresh, folder) == "default"
    assert torch.equal(output(fresh), expected)
    edit_config(folder, lambda c: c.update(modules={}), seal=True)  # a format 3 key
    assert_load_fails(folder, wc.AdapterError, MALFORMED + r"the configuration has the unknown "
                                                           r"key 'modules'")


def test_a_format_1_adapter_still_loads(saved: tuple[Path, torch.Tensor]) -> None:
    folder, expected = saved
    edit_config(folder, as_format_1, seal=False)
    fresh = net()
    assert wc.load_adapter(fresh, folder) == "default"
    assert torch.equal(output(fresh), expected)


def test_a_format_1_adapter_still_has_its_tensors_checked(
        saved: tuple[Path, torch.Tensor]) -> None:
    folder = saved[0]
    edit_config(folder, as_format_1, seal=False)
    data = bytearray((folder / TENSORS).read_bytes())
    data[-4:] = b"\x7f" * 4
    (folder / TENSORS).write_bytes(bytes(data))
    assert_load_fails(folder, wc.AdapterError, r"weightcond_adapter\.safetensors does not match "
                                               r"the SHA-256 recorded in weightcond_adapter\.json")


# -- the file names (issue 20, item 5) ---------------------------------------------------------
def with_old_names(folder: Path) -> None:
    """What weightcond wrote before it had file names of its own: PEFT's."""
    (folder / CONFIG).rename(folder / PEFT_CONFIG_FILE)
    (folder / TENSORS).rename(folder / PEFT_TENSORS_FILE)


def test_a_save_has_names_of_its_own(saved: tuple[Path, torch.Tensor]) -> None:
    assert entries(saved[0]) == ["weightcond_adapter.json", "weightcond_adapter.safetensors"]


@pytest.mark.parametrize("version", [1, 2])
def test_an_adapter_with_the_old_file_names_still_loads(
        version: int, saved: tuple[Path, torch.Tensor]) -> None:
    folder, expected = saved
    edit_config(folder, as_format_1 if version == 1 else as_format_2, seal=version == 2)
    with_old_names(folder)
    fresh = net()
    assert wc.load_adapter(fresh, folder) == "default"
    assert torch.equal(output(fresh), expected)


def test_errors_name_the_old_files_an_old_adapter_has(saved: tuple[Path, torch.Tensor]) -> None:
    folder = saved[0]
    with_old_names(folder)
    data = bytearray((folder / PEFT_TENSORS_FILE).read_bytes())
    data[-4:] = b"\x7f" * 4
    (folder / PEFT_TENSORS_FILE).write_bytes(bytes(data))
    assert_load_fails(folder, wc.AdapterError, r"load_adapter: adapter_model\.safetensors does "
                                               r"not match the SHA-256 recorded in "
                                               r"adapter_config\.json")
    (folder / PEFT_TENSORS_FILE).unlink()
    assert_load_fails(folder, wc.AdapterError, r"load_adapter: '.*' is not a saved adapter: "
                                               r"adapter_model\.safetensors missing")


def test_saving_over_an_old_adapter_replaces_it(saved: tuple[Path, torch.Tensor]) -> None:
    folder = saved[0]
    with_old_names(folder)
    model = conditioned("dora")
    wc.save_adapter(model, folder)
    assert entries(folder) == [CONFIG, TENSORS]
    fresh = net()
    wc.load_adapter(fresh, folder)
    assert torch.equal(output(fresh), output(model))


def test_each_loader_names_the_other_for_the_other_s_directory(tmp_path: Path) -> None:
    """A PEFT directory (to_peft writes one) is not a weightcond adapter, and a weightcond
    adapter, old names or new, is not a PEFT one: each error names the function to use."""
    model = conditioned("lora")
    peft_dir = wc.to_peft(model, tmp_path / "peft")
    assert entries(peft_dir) == [PEFT_CONFIG_FILE, PEFT_TENSORS_FILE]
    assert_load_fails(peft_dir, wc.AdapterError,
                      r"load_adapter: adapter_config\.json expected format "
                      r"'weightcond\.adapter', got None \(a PEFT adapter\? use "
                      r"weightcond\.from_peft\)")
    ours = wc.save_adapter(model, tmp_path / "ours")
    assert_import_fails(ours, wc.AdapterError,
                        r"from_peft: argument 'path' expected a PEFT adapter directory, got "
                        r"'.*ours' without adapter_config\.json \(a weightcond adapter: use "
                        r"weightcond\.load_adapter\)")
    with_old_names(ours)
    assert_import_fails(ours, wc.AdapterError,
                        r"from_peft: adapter_config\.json expected a PEFT configuration, got "
                        r"format 'weightcond\.adapter' \(a weightcond adapter: use "
                        r"weightcond\.load_adapter\)")


# -- modules saved whole (issue 20, item 4) ---------------------------------------------------
def with_trained_fc2() -> Net:
    """A lora adapter on fc1 and fc2 unfrozen and trained with it, as a head would be."""
    model = conditioned("lora")
    wc.remove_conditioning(model.fc2)
    model.fc2.requires_grad_(True)
    randomize(model.fc2, seed=7)
    return model


def test_a_module_to_save_is_restored_and_trainable(tmp_path: Path) -> None:
    model = with_trained_fc2()
    folder = wc.save_adapter(model, tmp_path / "adapter", modules_to_save=["fc2"])
    assert read_config(folder)["modules"] == {"fc2": {"tensors": ["bias", "weight"]}}
    fresh = net()
    wc.load_adapter(fresh, folder)
    assert torch.equal(output(fresh), output(model))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad]

    without = net()  # not named: the adapter alone, the head as the base model has it
    wc.load_adapter(without, wc.save_adapter(model, tmp_path / "alone"))
    assert torch.equal(without.fc2.weight, net().fc2.weight)


@pytest.mark.parametrize(("modules", "error", "pattern"), [
    ("fc2", wc.OptionError, r"save_adapter: argument 'modules_to_save' expected a list of "
                            r"module names, got 'fc2'"),
    (["fc3"], wc.OptionError, r"save_adapter: argument 'modules_to_save' expected names of "
                              r"modules of the model, got 'fc3'"),
    ([""], wc.OptionError, r"expected names of modules of the model, got ''"),
    (["fc1"], wc.AdapterError, r"save_adapter: argument 'modules_to_save' has 'fc1', which "
                               r"holds or is inside the conditioned layer 'fc1': a module to "
                               r"save is not also conditioned"),
], ids=["a-str", "unknown", "the-model", "conditioned"])
def test_modules_to_save_that_cannot_be_saved_are_refused(
        modules: Any, error: type[Exception], pattern: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=pattern):
        wc.save_adapter(with_trained_fc2(), tmp_path / "adapter", modules_to_save=modules)
    assert entries(tmp_path) == []


def test_a_module_inside_another_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    wc.condition(model, "lora", target_modules="0", rank=2)  # a regex: not 1.0
    with pytest.raises(wc.AdapterError, match=r"save_adapter: argument 'modules_to_save' has "
                                              r"'1\.0', which is inside '1', also given"):
        wc.save_adapter(model, tmp_path / "adapter", modules_to_save=["1.0", "1"])


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda c: c["modules"].update(fc3={"tensors": ["weight"]}),
     r"load_adapter: the adapter saves modules the model does not have: 'fc3'"),
    (lambda c: c["modules"].update(fc2={"tensors": ["weight"]}),
     r"load_adapter: weightcond_adapter\.safetensors does not match weightcond_adapter\.json: "
     r"missing none, extra \['fc2\.bias'\]"),
    (lambda c: c["modules"].update(fc2=["bias", "weight"]),
     MALFORMED + r"'modules' expected an object of module names to \{'tensors': \[names\]\}"),
    (lambda c: c["modules"].update(fc1=c["modules"].pop("fc2")),
     r"load_adapter: the saved module 'fc1' holds or is inside the conditioned layer 'fc1'"),
])
def test_a_saved_module_that_does_not_fit_is_refused(change: Callable[[dict[str, Any]], Any],
                                                     pattern: str, tmp_path: Path) -> None:
    folder = wc.save_adapter(with_trained_fc2(), tmp_path / "adapter", modules_to_save=["fc2"])
    if "fc1" in pattern:  # the tensors move with the record
        def rename(tensors: dict[str, torch.Tensor]) -> None:
            for key in ("weight", "bias"):
                tensors[f"fc1.{key}"] = tensors.pop(f"fc2.{key}")
        edit_tensors(folder, rename)
    edit_config(folder, change, seal=True)
    assert_load_fails(folder, wc.AdapterError, pattern)


@pytest.mark.parametrize(("value", "pattern"), [
    (torch.zeros(8, 4), r"load_adapter: tensor 'fc2\.weight' expected shape \(8, 8\), got "
                        r"\(8, 4\)"),
    (torch.full((8, 8), float("nan")), r"tensor 'fc2\.weight' expected finite values"),
    (torch.ones(8, 8, dtype=torch.int64), r"tensor 'fc2\.weight' expected a floating-point "
                                          r"tensor, got dtype int64"),
], ids=["shape", "nan", "int64"])
def test_saved_module_tensors_are_checked(value: torch.Tensor, pattern: str,
                                          tmp_path: Path) -> None:
    folder = wc.save_adapter(with_trained_fc2(), tmp_path / "adapter", modules_to_save=["fc2"])
    edit_tensors(folder, lambda t: t.update({"fc2.weight": value}))
    assert_load_fails(folder, wc.AdapterError, pattern)


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda c: c.pop("recipe_sha256"),
     r"'recipe_sha256' expected a SHA-256 hex digest \(format 2 on\), got None"),
    (lambda c: c.update(recipe_sha256="Z" * 64),
     r"'recipe_sha256' expected a SHA-256 hex digest \(format 2 on\), got 'ZZZZ"),
    (lambda c: c.update(format_version=4),
     r"format_version expected 1\.\.3, got 4"),
], ids=["missing", "not-hex", "too-new"])
def test_a_format_2_adapter_needs_its_recipe_digest(change: Callable[[dict[str, Any]], Any],
                                                   pattern: str,
                                                   saved: tuple[Path, torch.Tensor]) -> None:
    edit_config(saved[0], change, seal=False)
    assert_load_fails(saved[0], wc.AdapterError, MALFORMED + pattern)


# -- tensors ----------------------------------------------------------------------------------
def set_value(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
    return change


def retype(key: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.update({key: tensors[key].to(dtype)})


TENSOR_CASES = [
    ("int64", retype(A, torch.int64),
     rf"load_adapter: tensor '{A}' expected a floating dtype \(one of bfloat16, float16, "
     r"float32, float64\), got int64"),
    ("bool", retype(A, torch.bool), r"expected a floating dtype .*, got bool"),
    ("complex", retype(A, torch.complex64), r"expected a floating dtype .*, got complex64"),
    ("nan", set_value(A, float("nan")),
     rf"load_adapter: tensor '{A}' expected finite values, got NaN or infinite ones"),
    ("inf", set_value(A, float("inf")), rf"tensor '{A}' expected finite values"),
]


@pytest.mark.parametrize("case", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_tensors_of_the_wrong_dtype_or_not_finite_are_refused(
        case: tuple, saved: tuple[Path, torch.Tensor]) -> None:
    _, change, pattern = case
    edit_tensors(saved[0], change)
    assert_load_fails(saved[0], wc.AdapterError, pattern)


@pytest.mark.parametrize("kept", [torch.float32, torch.float64], ids=str)
def test_an_adapter_kept_in_another_dtype_than_its_base_loads_as_saved(
        kept: torch.dtype, tmp_path: Path) -> None:
    """Adapter parameters kept in float32 on a bfloat16 base (PEFT's autocast_adapter_dtype):
    they load in the dtype they were saved in, bit for bit (regression, found in review:
    the load refused them after validation required the layer's dtype)."""
    model = net(torch.bfloat16)
    wc.condition(model, "dora", target_modules=["fc1"], rank=2)
    randomize(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(kept)
    x = X.to(torch.bfloat16)
    folder = wc.save_adapter(model, tmp_path / "adapter")
    fresh = net(torch.bfloat16)
    fresh.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                           for k, v in model.state_dict().items() if ".adapters." not in k})
    wc.load_adapter(fresh, folder)
    assert {p.dtype for p in fresh.parameters() if p.requires_grad} == {kept}
    assert torch.equal(fresh(x), model(x))


def test_tensors_that_overflow_the_models_dtype_are_refused(tmp_path: Path) -> None:
    model = conditioned("lora")
    with torch.no_grad():
        wc.get_update(model.fc1).B.mul_(1e6)
    folder = wc.save_adapter(model, tmp_path / "adapter")
    assert_load_fails(folder, wc.AdapterError,
                      r"load_adapter: tensor 'fc1\.update\.B' expected values finite in "
                      r"float16 \(the model's dtype\), got some that overflow it",
                      model=net(torch.float16))


def test_a_model_on_the_meta_device_still_loads(tmp_path: Path) -> None:
    """The value checks run on the file's tensors, not after the move to the model's
    device: a model built on the meta device (to be materialised later) still loads."""
    folder = wc.save_adapter(conditioned("lora"), tmp_path / "adapter")
    with torch.device("meta"):
        model = Net()
    assert wc.load_adapter(model, folder) == "default"
    assert wc.get_update(model.fc1).A.device.type == "meta"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["save_adapter", "to_peft"])
def test_an_adapter_that_is_not_finite_is_not_saved(name: str, value: float,
                                                    tmp_path: Path) -> None:
    model = lora()
    with torch.no_grad():
        wc.get_update(model.fc2).B[1, 0] = value
    with pytest.raises(wc.AdapterError, match=rf"{name}: tensor '.*fc2.*' has NaN or infinite "
                                              r"values; a saved adapter is finite"):
        call(name, model, tmp_path / "adapter")
    assert entries(tmp_path) == []


# -- configuration fields ---------------------------------------------------------------------
def layer(name: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    return lambda config: change(config["layers"][name])


FIELDS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("format-version-true", lambda c: c.update(format_version=True),
     MALFORMED + r"format_version expected 1\.\.3, got True"),
    ("format-version-float", lambda c: c.update(format_version=2.0),
     MALFORMED + r"format_version expected 1\.\.3, got 2\.0"),
    ("shape-bool", layer("fc1", lambda r: r.update(shape=[True, 8])),
     MALFORMED + r"layer 'fc1': 'shape' expected \[out, in\], got \[True, 8\]"),
    ("rank-bool", layer("fc1", lambda r: r["update"].update(rank=True)),
     MALFORMED + r"layer 'fc1': 'update' expected null or \{'rank': int, 'alpha': number\}, "
                 r"got \{'rank': True, 'alpha': 4\.0\}"),
    ("alpha-bool", layer("fc1", lambda r: r["update"].update(alpha=True)),
     MALFORMED + r"layer 'fc1': 'update' expected null .*, got \{'rank': 2, 'alpha': True\}"),
    # the range is registration's check (weightcond.layer), which a load goes through
    ("alpha-absurd", layer("fc1", lambda r: r["update"].update(alpha=1e308)),
     r"load_adapter: layer 'fc1': argument 'alpha' expected a number representable in the "
     r"layer's dtype torch\.float32 .*, got 1e\+308"),
    ("update-extra-key", layer("fc1", lambda r: r["update"].update(scaling=2.0)),
     MALFORMED + r"layer 'fc1': 'update' has the unknown key 'scaling'; expected 'rank', "
                 r"'alpha'"),
    ("record-extra-key", layer("fc1", lambda r: r.update(scale=2.0)),
     MALFORMED + r"layer 'fc1' has the unknown key 'scale'; expected 'kind', 'shape', 'dtype', "
                 r"'update', 'conditioners', 'tensors'"),
    ("conditioner-extra-key", conditioner("fc1", 1, lambda c: c.update(weight=2.0)),
     MALFORMED + r"layer 'fc1': conditioner 1 has the unknown key 'weight'; expected "
                 r"'placement', 'side', 'transform', 'options', 'condition_bias'"),
    ("top-extra-key", lambda c: c.update(scaling=2.0),
     MALFORMED + r"the configuration has the unknown key 'scaling'; expected 'format', "
                 r"'format_version', "),
    ("dtype-int", layer("fc1", lambda r: r.update(dtype="int64")),
     MALFORMED + r"layer 'fc1': 'dtype' expected one of 'bfloat16', .*'float32'.*, "
                 r"got 'int64'"),
    ("dtype-missing", layer("fc1", lambda r: r.pop("dtype")),
     MALFORMED + r"layer 'fc1': 'dtype' expected one of .*, got None"),
    ("digest-not-hex", lambda c: c.update(tensors_sha256="z" * 64),
     MALFORMED + r"'tensors_sha256' expected a SHA-256 hex digest, got 'zzzz"),
    ("version-not-a-str", lambda c: c.update(weightcond_version=[0, 1]),
     MALFORMED + r"'weightcond_version' expected a str, got \[0, 1\]"),
    ("model-not-a-str", lambda c: c.update(model=None),
     MALFORMED + r"'model' expected a str, got None"),
    ("long-value", lambda c: c.update(format_version=list(range(10_000))),
     MALFORMED + r"format_version expected 1\.\.3, got \[0, 1, 2, [^\]]{0,80}… \(saved by "),
]


@pytest.mark.parametrize("case", FIELDS, ids=[c[0] for c in FIELDS])
def test_configuration_fields_of_the_wrong_type_or_range_are_refused(
        case: tuple, saved: tuple[Path, torch.Tensor]) -> None:
    _, change, pattern = case
    edit_config(saved[0], change, seal=True)
    assert_load_fails(saved[0], wc.AdapterError, pattern)


def test_an_absurd_float_option_is_refused(tmp_path: Path) -> None:
    # magnitude's eps is a float the transform accepts at any size; 1e308 is inf in float32
    # (the range is registration's check, in weightcond.layer, which a load goes through)
    folder = wc.save_adapter(conditioned("dora"), tmp_path / "adapter")
    edit_config(folder, conditioner("fc1", 0, lambda c: c["options"].update(eps=1e308)),
                seal=True)
    assert_load_fails(folder, wc.AdapterError,
                      r"load_adapter: layer 'fc1': magnitude: argument 'eps' expected a number "
                      r"representable in the layer's dtype torch\.float32 .*, got 1e\+308")


# -- PEFT directories -------------------------------------------------------------------------
PEFT = r"from_peft: adapter_config\.json "
PREFIX = "base_model.model."


@pytest.fixture
def peft_dir(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A PEFT LoRA directory (written by to_peft, so no peft is needed) and its output."""
    model = lora()
    return wc.to_peft(model, tmp_path / "peft"), output(model)


def edit_peft(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    change(config)
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config))


def edit_peft_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    tensors = safetensors.torch.load((folder / PEFT_TENSORS_FILE).read_bytes())
    change(tensors)
    safetensors.torch.save_file(tensors, folder / PEFT_TENSORS_FILE)


def assert_import_fails(folder: Path, error: type[Exception], pattern: str) -> None:
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=pattern):
        wc.from_peft(model, folder)
    assert not wc.conditioned_layers(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_peft_directory_imports(peft_dir: tuple[Path, torch.Tensor]) -> None:
    model = net()
    wc.from_peft(model, peft_dir[0])
    torch.testing.assert_close(output(model), peft_dir[1], atol=1e-6, rtol=1e-6)


PEFT_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("alpha-pattern-list", {"alpha_pattern": ["fc1"]},
     PEFT + r"expected 'alpha_pattern' to be null or an object mapping module-name patterns "
            r"to numbers > 0, got \['fc1'\]"),
    ("rank-pattern-list", {"rank_pattern": ["fc1"]},
     PEFT + r"expected 'rank_pattern' to be null or an object mapping module-name patterns "
            r"to ints >= 1, got \['fc1'\]"),
    ("alpha-pattern-regex", {"alpha_pattern": {"fc(": 2}},
     PEFT + r"'alpha_pattern' has the key 'fc\(', which is not a valid regular expression "
            r"\(missing \), unterminated subpattern"),
    ("rank-pattern-regex", {"rank_pattern": {"[fc": 2}},
     PEFT + r"'rank_pattern' has the key '\[fc', which is not a valid regular expression"),
    ("alpha-pattern-value", {"alpha_pattern": {"fc1": "2"}},
     PEFT + r"expected 'alpha_pattern' to be .*, got \{'fc1': '2'\}"),
    ("alpha-pattern-bool", {"alpha_pattern": {"fc1": True}},
     PEFT + r"expected 'alpha_pattern' to be .*, got \{'fc1': True\}"),
    ("rank-pattern-zero", {"rank_pattern": {"fc1": 0}},
     PEFT + r"expected 'rank_pattern' to be .*, got \{'fc1': 0\}"),
    ("lora-alpha-str", {"lora_alpha": "8", "use_rslora": True},
     PEFT + r"expected 'lora_alpha' to be a finite number > 0, got '8'"),
    ("lora-alpha-bool", {"lora_alpha": True},
     PEFT + r"expected 'lora_alpha' to be a finite number > 0, got True"),
    ("r-bool", {"r": True}, PEFT + r"expected 'r' to be an int >= 1, got True"),
    ("use-rslora-str", {"use_rslora": "false"},
     PEFT + r"expected 'use_rslora' to be a bool, got 'false'"),
    ("use-dora-str", {"use_dora": "no"}, PEFT + r"expected 'use_dora' to be a bool, got 'no'"),
    ("peft-type-list", {"peft_type": ["LORA"]},
     PEFT + r"expected peft_type one of 'LORA', 'OFT', 'HRA', 'BOFT', got \['LORA'\]"),
    ("r-mismatch", {"r": 3},
     r"from_peft: layer 'fc1': lora_A has rank 2, but adapter_config\.json gives it rank 3 "
     r"\('r' and 'rank_pattern'\)"),
    ("rank-pattern-mismatch", {"rank_pattern": {"fc2": 4}},
     r"from_peft: layer 'fc2': lora_A has rank 2, but adapter_config\.json gives it rank 4"),
    ("nested", {"target_modules": json.loads(nested(100))},
     r"from_peft: malformed adapter_config\.json: nested more than 64 levels"),
]


@pytest.mark.parametrize("case", PEFT_FIELDS, ids=[c[0] for c in PEFT_FIELDS])
def test_peft_configuration_fields_of_the_wrong_type_are_refused(
        case: tuple, peft_dir: tuple[Path, torch.Tensor]) -> None:
    _, fields, pattern = case
    edit_peft(peft_dir[0], lambda c: c.update(fields))
    assert_import_fails(peft_dir[0], wc.AdapterError, pattern)


def test_a_deeply_nested_peft_configuration_is_malformed(
        peft_dir: tuple[Path, torch.Tensor]) -> None:
    (peft_dir[0] / PEFT_CONFIG_FILE).write_text(nested(100_000))
    assert_import_fails(peft_dir[0], wc.AdapterError,
                        r"from_peft: malformed adapter_config\.json: nested more than 64 levels")


def peft_set(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return change


LORA_A = PREFIX + "fc1.lora_A.weight"
PEFT_TENSORS = [
    ("int64", lambda t: t.update({LORA_A: t[LORA_A].to(torch.int64)}),
     r"from_peft: tensor 'base_model\.model\.fc1\.lora_A\.weight' expected a floating-point "
     r"tensor, got dtype int64"),
    ("bool", lambda t: t.update({LORA_A: t[LORA_A].bool()}), r"got dtype bool"),
    ("nan", peft_set(LORA_A, float("nan")),
     r"from_peft: tensor 'base_model\.model\.fc1\.lora_A\.weight' expected finite values, got "
     r"NaN or infinite ones"),
    ("scalar", lambda t: t.update({LORA_A: torch.tensor(1.0)}),
     r"from_peft: layer 'fc1': from_peft_tensors\('lora'\): tensor 'lora_A' expected 2 "
     r"dimensions, got shape \(\)"),
    ("duplicate-name", lambda t: t.update({PREFIX + "fc1.oft_R": torch.zeros(1, 1),
                                           PREFIX + "fc1.oft_R.weight": torch.ones(1, 1)}),
     r"from_peft: adapter_model\.safetensors has two tensors for 'oft_R' of layer 'fc1': "
     r"'base_model\.model\.fc1\.oft_R', 'base_model\.model\.fc1\.oft_R\.weight'"),
]


@pytest.mark.parametrize("case", PEFT_TENSORS, ids=[c[0] for c in PEFT_TENSORS])
def test_peft_tensors_of_the_wrong_dtype_or_not_finite_are_refused(
        case: tuple, peft_dir: tuple[Path, torch.Tensor]) -> None:
    _, change, pattern = case
    edit_peft_tensors(peft_dir[0], change)
    assert_import_fails(peft_dir[0], wc.AdapterError, pattern)


def test_a_dora_magnitude_saved_twice_is_refused(tmp_path: Path) -> None:
    folder = wc.to_peft(conditioned("dora"), tmp_path / "peft")
    key = PREFIX + "fc1.lora_magnitude_vector"
    edit_peft_tensors(folder, lambda t: t.update({key + ".weight": 2 * t[key]}))
    assert_import_fails(folder, wc.AdapterError, r"has two tensors for 'lora_magnitude_vector' "
                                                 r"of layer 'fc1'")


# -- PEFT tensors -----------------------------------------------------------------------------
LORA = {"lora_A": torch.zeros(2, 8), "lora_B": torch.zeros(8, 2)}
FROM_TENSORS = [
    ("method-list", (["lora"], LORA), wc.UnknownNameError,
     r"from_peft_tensors: argument 'method' expected one of 'lora', 'dora', 'oft', 'hra', "
     r"'boft', got \['lora'\]"),
    ("tensors-not-a-mapping", ("lora", [("lora_A", torch.zeros(2, 8))]), wc.OptionError,
     r"from_peft_tensors\('lora'\): argument 'tensors' expected a mapping of names to tensors, "
     r"got list"),
    ("not-a-tensor", ("lora", {**LORA, "lora_A": [[0.0] * 8] * 2}), wc.OptionError,
     r"from_peft_tensors\('lora'\): tensor 'lora_A' expected a torch\.Tensor, got list"),
    ("int64", ("lora", {**LORA, "lora_A": torch.ones(2, 8, dtype=torch.int64)}),
     wc.OptionError,
     r"from_peft_tensors\('lora'\): tensor 'lora_A' expected a floating-point tensor, got "
     r"dtype int64"),
    ("inf", ("lora", {**LORA, "lora_B": torch.full((8, 2), float("inf"))}), wc.OptionError,
     r"from_peft_tensors\('lora'\): tensor 'lora_B' expected finite values, got NaN or "
     r"infinite ones"),
    ("lora-scalar", ("lora", {**LORA, "lora_A": torch.tensor(0.0)}), wc.ShapeError,
     r"from_peft_tensors\('lora'\): tensor 'lora_A' expected 2 dimensions, got shape \(\)"),
    ("oft-scalar", ("oft", {"oft_R": torch.tensor(0.0)}), wc.ShapeError,
     r"tensor 'oft_R' expected 2 dimensions, got shape \(\)"),
    ("hra-vector", ("hra", {"hra_u": torch.zeros(8)}), wc.ShapeError,
     r"tensor 'hra_u' expected 2 dimensions, got shape \(8,\)"),
    ("boft-not-square", ("boft", {"boft_R": torch.zeros(1, 2, 4, 3), "boft_s": torch.ones(8, 1)}),
     wc.ShapeError,
     r"from_peft_tensors\('boft'\): tensor 'boft_R' expected square blocks \(factors, blocks, "
     r"b, b\), got shape \(1, 2, 4, 3\)"),
    ("boft-vector", ("boft", {"boft_R": torch.zeros(4), "boft_s": torch.ones(8, 1)}),
     wc.ShapeError, r"tensor 'boft_R' expected 4 dimensions, got shape \(4,\)"),
    ("float-overflow", ("lora", {**LORA, "lora_B": torch.full((8, 2), 1e30,
                                                              dtype=torch.float64)}),
     wc.OptionError, r"from_peft_tensors\('lora'\): tensor 'lora_B' expected values finite "
                     r"in float16 \(the layer's dtype\), got some that overflow it"),
]


@pytest.mark.parametrize("case", FROM_TENSORS, ids=[c[0] for c in FROM_TENSORS])
def test_peft_tensors_that_do_not_fit_are_refused_and_change_nothing(case: tuple) -> None:
    _, (method, tensors), error, pattern = case
    layer = nn.Linear(8, 8)
    if case[0] == "float-overflow":
        layer = layer.half()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=pattern):
        wc.interop.from_peft_tensors(layer, method, tensors)
    assert not wc.is_conditioned(layer)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(("option", "value", "pattern"), [
    ("lora_alpha", True, r"argument 'lora_alpha' expected a finite number > 0, got True"),
    ("lora_alpha", 10**400, r"argument 'lora_alpha' expected a finite number > 0, got 1000"),
    ("use_cayley_neumann", "false",
     r"argument 'use_cayley_neumann' expected a bool, got 'false'"),
    ("oft_block_size", "4", r"argument 'oft_block_size' expected an int, got '4'"),
    ("num_cayley_neumann_terms", 0,
     r"argument 'num_cayley_neumann_terms' expected an int >= 1, got 0"),
], ids=["alpha-bool", "alpha-huge", "neumann-str", "block-size-str", "terms-zero"])
def test_peft_options_of_the_wrong_type_are_refused(option: str, value: Any, pattern: str
                                                    ) -> None:
    method = "lora" if option == "lora_alpha" else "oft"
    tensors = LORA if method == "lora" else {"oft_R": torch.zeros(2, 6)}
    layer = nn.Linear(8, 8)
    with pytest.raises(wc.OptionError, match=rf"from_peft_tensors\('{method}'\): " + pattern):
        wc.interop.from_peft_tensors(layer, method, tensors, **{option: value})
    assert not wc.is_conditioned(layer)


def test_os_pathlike_paths_are_accepted(saved: tuple[Path, torch.Tensor]) -> None:
    class Where(os.PathLike):  # type: ignore[type-arg]
        def __fspath__(self) -> str:
            return str(saved[0])

    fresh = net()
    assert wc.load_adapter(fresh, Where()) == "default"
    assert torch.equal(output(fresh), saved[1])
