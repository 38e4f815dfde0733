"""Robustness of registration (issue 19): every unusable layer or option is a typed error at
registration that leaves the layer exactly as it was; registration under
``torch.inference_mode()`` gives a layer that trains; ``disabled``/``dense_forward`` are
per-thread; a conditioned model refuses to be pickled with a typed error naming the
supported ways to save it."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import weightcond as wc
from weightcond.transforms.maps import cayley

from helpers import PRESET_NAMES, Wrapped, make_layer, randomize, trainable

# the four ways to register on a layer (out=8, in=8), each into a fresh adapter
REGISTER: dict[str, Callable[[nn.Module], Any]] = {
    "register_update": lambda layer: wc.register_update(layer, rank=2),
    "register_conditioning": lambda layer: wc.register_conditioning(layer, transform="diag"),
    "apply_preset": lambda layer: wc.apply_preset(layer, "sora", rank=2),
    "condition": lambda layer: wc.condition(Wrapped(layer), "dora", target_modules=["proj"],
                                            rank=2),
}


def snapshot(layer: nn.Module) -> tuple[Any, ...]:
    """What "left exactly as it was" compares: the class, the very tensors registered, the
    attributes and hooks (no tensor is read: a lazy layer's weight has no data)."""
    return (type(layer), dict(layer._parameters), dict(layer._buffers), dict(layer._modules),
            sorted(layer.__dict__), dict(layer._forward_pre_hooks))


def assert_untouched(layer: nn.Module, before: tuple[Any, ...]) -> None:
    after = snapshot(layer)
    assert after[0] is before[0] and not wc.is_conditioned(layer)
    for got, expected in zip(after[1:], before[1:], strict=True):
        assert got == expected if not isinstance(got, dict) else (
            got.keys() == expected.keys() and all(got[k] is expected[k] for k in got))
    assert not torch.nn.utils.parametrize.is_parametrized(layer)


def refused(layer: nn.Module, error: type[Exception], pattern: str) -> None:
    """Every registration function refuses ``layer`` with ``error`` and leaves it alone."""
    for where, call in REGISTER.items():
        before = snapshot(layer)
        with pytest.raises(error, match=pattern) as info:
            call(layer)
        assert isinstance(info.value, wc.WeightcondError)
        message = str(info.value)
        assert message.startswith(where) or message.startswith("apply_preset"), message
        assert_untouched(layer, before)


# -- 1. inference mode ------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_registering_under_inference_mode_gives_a_layer_that_trains(name: str) -> None:
    """The new parameters are created outside inference mode: they are normal tensors, so the
    first training step works (it raised "Inference tensors cannot be saved for backward")."""
    layer = make_layer(16, 16)
    options = {"rank": 2} if wc.PRESETS[name].update else {}
    with torch.inference_mode():
        wc.apply_preset(layer, name, **options)
        inside = layer(torch.ones(3, 16, dtype=torch.float64))  # it computes in there too
    assert all(not t.is_inference() for t in [*layer.parameters(), *layer.buffers()])
    randomize(layer)
    params = [p for _, p in trainable(layer)]
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(layer(x).square().sum(), [x, *params])
    assert all(torch.isfinite(g).all() for g in grads)
    assert inside.shape == (3, 16)


def test_condition_and_register_under_inference_mode_train() -> None:
    model = Wrapped(make_layer(12, 10))
    with torch.inference_mode():
        wc.condition(model, "sora", target_modules=["proj"], rank=2)
        wc.register_conditioning(model.proj, placement="post", transform="householder",
                                 reflections=2)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.is_inference() for p in model.parameters())
    model(torch.randn(3, 10, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("mode", ["outside", "inside"])
@pytest.mark.parametrize("tensor", ["weight", "bias"])
def test_an_inference_tensor_in_the_layer_is_refused(mode: str, tensor: str) -> None:
    """A layer built under inference mode has inference tensors, which cannot be saved for
    backward nor registered by parametrize outside inference mode; weightcond never replaces
    the base tensors (remove_conditioning gives back the very same objects), so it refuses
    them and says how to get normal ones."""
    layer = make_layer(8, 8)
    with torch.inference_mode():
        frozen = getattr(layer, tensor).clone()
    setattr(layer, tensor, nn.Parameter(frozen, requires_grad=False))
    with torch.inference_mode() if mode == "inside" else contextlib.nullcontext():
        refused(layer, wc.StateError,
                rf"argument 'layer' expected a layer whose tensors are not inference tensors, "
                rf"got Linear whose '{tensor}' was created under torch.inference_mode\(\).*clone")


# -- 2. layers whose weight cannot be conditioned ---------------------------------------------
def _none() -> nn.Module:
    layer = make_layer(8, 8)
    layer.weight = None
    return layer


def _dtype(dtype: torch.dtype) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layer = make_layer(8, 8)
        layer.weight = nn.Parameter(layer.weight.detach().to(dtype), requires_grad=False)
        return layer
    return build


def _one_dimensional() -> nn.Module:
    layer = make_layer(8, 8)
    layer.weight = nn.Parameter(torch.ones(8, dtype=torch.float64), requires_grad=False)
    return layer


def _sparse() -> nn.Module:
    layer = make_layer(8, 8)
    layer.weight = nn.Parameter(layer.weight.detach().to_sparse(), requires_grad=False)
    return layer


def _plain_attribute() -> nn.Module:
    layer = make_layer(8, 8)
    weight = layer.weight.detach()
    del layer.weight
    layer.weight = weight  # neither a parameter nor a buffer
    return layer


def _weight_norm() -> nn.Module:
    with warnings.catch_warnings():  # deprecated in favour of parametrizations.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(make_layer(8, 8))


UNUSABLE = [
    ("weight-none", _none, wc.LayerTypeError,
     r"argument 'layer' expected a layer whose 'weight' is a tensor, got Linear whose "
     r"'weight' is None"),
    ("int8", _dtype(torch.int8), wc.LayerTypeError,
     r"argument 'layer' expected a weight of dtype torch.float16, torch.bfloat16, "
     r"torch.float32 or torch.float64, got torch.int8"),
    ("complex", _dtype(torch.complex64), wc.LayerTypeError, r"got torch.complex64"),
    ("float8", _dtype(torch.float8_e4m3fn), wc.LayerTypeError, r"got torch.float8_e4m3fn"),
    ("lazy", lambda: nn.LazyLinear(8), wc.StateError,
     r"argument 'layer' expected a layer with an initialized weight, got LazyLinear whose "
     r"weight is uninitialized \(run one forward first"),
    ("weight-norm", _weight_norm, wc.StateError,
     r"argument 'layer' expected a layer whose 'weight' is a parameter or a buffer, got "
     r"Linear whose 'weight' is recomputed by a WeightNorm forward pre-hook \(the hook-based "
     r"torch.nn.utils.weight_norm or spectral_norm\); remove it first"),
    ("spectral-norm", lambda: torch.nn.utils.spectral_norm(make_layer(8, 8)), wc.StateError,
     r"got Linear whose 'weight' is recomputed by a SpectralNorm forward pre-hook"),
    ("plain-attribute", _plain_attribute, wc.StateError,
     r"argument 'layer' expected a layer whose 'weight' is a parameter or a buffer, got "
     r"Linear whose 'weight' is a plain tensor attribute"),
    ("one-dimensional", _one_dimensional, wc.ShapeError,
     r"argument 'layer' expected a 2-D weight for a Linear, got one of shape \(8,\)"),
    ("sparse", _sparse, wc.LayerTypeError,
     r"argument 'layer' expected a dense \(torch.strided\) weight, got torch.sparse_coo"),
]


@pytest.mark.parametrize("case", UNUSABLE, ids=[c[0] for c in UNUSABLE])
def test_a_layer_whose_weight_cannot_be_conditioned_is_refused(case) -> None:
    _, build, error, pattern = case
    refused(build(), error, pattern)


# -- 3. options that do not fit the layer's dtype, user maps ----------------------------------
@pytest.mark.parametrize("dtype,eps", [(torch.float16, 1e6), (torch.float16, 1e39),
                                       (torch.bfloat16, 1e39), (torch.float32, 1e39),
                                       (torch.float16, 70000)],
                         ids=["fp16-1e6", "fp16-1e39", "bf16-1e39", "fp32-1e39", "fp16-int"])
def test_an_eps_beyond_the_layer_dtype_is_refused(dtype: torch.dtype, eps: float) -> None:
    layer = make_layer(8, 8, dtype=dtype)
    limit = re.escape(f"{torch.finfo(dtype).max:g}")
    for call in (lambda: wc.register_conditioning(layer, transform="magnitude", eps=eps),
                 lambda: wc.apply_preset(layer, "dora", rank=2, eps=eps)):
        before = snapshot(layer)
        with pytest.raises(wc.OptionError, match=rf"magnitude: argument 'eps' expected a "
                           rf"number representable in the layer's dtype {dtype} \(at most "
                           rf"{limit}\), got {re.escape(repr(eps))}"):
            call()
        assert_untouched(layer, before)
    wc.register_conditioning(layer, transform="magnitude", eps=float(torch.finfo(dtype).max))


@pytest.mark.parametrize("dtype,alpha", [(torch.float16, 1e6), (torch.bfloat16, 1e39)],
                         ids=["fp16-1e6", "bf16-1e39"])
def test_an_alpha_beyond_the_layer_dtype_is_refused(dtype: torch.dtype, alpha: float) -> None:
    layer = make_layer(8, 8, dtype=dtype)
    limit = re.escape(f"{torch.finfo(dtype).max:g}")
    for where, call in (("register_update", lambda: wc.register_update(layer, rank=2,
                                                                        alpha=alpha)),
                        (r"apply_preset\('lora'\)", lambda: wc.apply_preset(layer, "lora",
                                                                             alpha=alpha))):
        before = snapshot(layer)
        with pytest.raises(wc.OptionError, match=rf"{where}: argument 'alpha' expected a number "
                           rf"representable in the layer's dtype {dtype} \(at most {limit}\), "
                           rf"got {re.escape(repr(alpha))}"):
            call()
        assert_untouched(layer, before)


def _takes_callable_map(name: str) -> bool:
    """Whether the transform accepts a callable ``map`` (the registry says which)."""
    cls = wc.TRANSFORMS[name]
    if "map" not in inspect.signature(cls.__init__).parameters:
        return False
    try:
        wc.register_conditioning(make_layer(8, 8), transform=name, map=cayley)
    except wc.UnknownNameError:
        return False
    return True


MAP_TRANSFORMS = [n for n in wc.TRANSFORMS if _takes_callable_map(n)]

BAD_MAPS = {
    "wrong-shape": lambda s: torch.zeros(3, 3, dtype=s.dtype),
    "raises": lambda s: 1 / 0,
    "returns-none": lambda s: None,
}


def test_the_registry_has_transforms_with_callable_maps() -> None:
    assert {"block", "butterfly", "orthogonal"} <= set(MAP_TRANSFORMS)


@pytest.mark.parametrize("bad", BAD_MAPS, ids=list(BAD_MAPS))
@pytest.mark.parametrize("name", MAP_TRANSFORMS)
def test_a_user_map_that_does_not_fit_is_a_shape_error(name: str, bad: str) -> None:
    layer = make_layer(8, 8)
    before = snapshot(layer)
    with pytest.raises(wc.ShapeError, match=rf"register_conditioning: {name}: argument 'map' "
                       rf"expected a callable that returns a matrix of its input's shape "
                       rf"\(\.\.\., k, k\) and dtype, got <function .*, with which the "
                       rf"transform's apply\(\) of a \(8,\) input fails \(\w+Error: .+\)"):
        wc.register_conditioning(layer, transform=name, map=BAD_MAPS[bad])
    assert_untouched(layer, before)


class Raising(wc.Transform):
    """A user transform that fails on the layer's dtype."""

    def apply(self, h, *, transpose=False):
        raise RuntimeError("not on this dtype")


def test_a_user_transform_that_fails_on_the_layer_is_a_typed_error() -> None:
    layer = make_layer(8, 8)
    before = snapshot(layer)
    with pytest.raises(wc.LayerTypeError, match=r"register_conditioning: argument 'transform' "
                       r"expected a transform that runs on the layer's torch.float64 weight "
                       r"on cpu, got Raising, whose apply\(\) of a \(8,\) input fails "
                       r"\(RuntimeError: not on this dtype\)"):
        wc.register_conditioning(layer, transform=Raising(8))
    assert_untouched(layer, before)


class NeedsOption(wc.Transform):
    """A user transform with an option that has no default."""

    def __init__(self, dim: int, *, width: int) -> None:
        super().__init__(dim)

    def apply(self, h, *, transpose=False):
        return h


@pytest.mark.parametrize("transform,error,pattern", [
    (NeedsOption, wc.OptionError,
     r"register_conditioning: argument 'width' expected a value \(transform 'NeedsOption' has "
     r"no default for it\), got none"),
    (wc.Transform, wc.OptionError,
     r"register_conditioning: argument 'transform' expected a registered name \(.*\), a "
     r"Transform subclass or a Transform instance, got the base class Transform itself"),
    (torch.nn.Linear, wc.OptionError, r"got the class Linear"),
], ids=["missing-option", "base-class", "other-class"])
def test_a_transform_class_that_cannot_be_built_is_refused(transform, error, pattern) -> None:
    layer = make_layer(8, 8)
    before = snapshot(layer)
    with pytest.raises(error, match=pattern):
        wc.register_conditioning(layer, transform=transform)
    assert_untouched(layer, before)


def test_condition_restores_the_layers_conditioned_before_a_refused_one() -> None:
    model = nn.Sequential(make_layer(8, 8), _weight_norm())
    first = snapshot(model[0])
    with pytest.raises(wc.StateError, match=r"WeightNorm forward pre-hook") as info:
        wc.condition(model, "dora", target_modules=["0", "1"], rank=2)
    assert "while conditioning module '1'" in info.value.__notes__
    assert_untouched(model[0], first)


# -- 4. disabled and dense_forward are per-thread ---------------------------------------------
def conditioned_model() -> Wrapped:
    model = Wrapped(make_layer(12, 10))
    wc.condition(model, "sora", target_modules=["proj"], rank=2)
    randomize(model)
    return model


def in_thread(body: Callable[[], Any], entered: threading.Event,
              release: threading.Event) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``body`` in a thread; it sets ``entered`` inside its context and waits for
    ``release`` before leaving it."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = body()
        except BaseException as error:  # reported by the main thread
            result["error"] = error
            entered.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert entered.wait(10)
    return thread, result


def test_disabled_in_one_thread_leaves_another_thread_conditioned() -> None:
    model = conditioned_model()
    x = torch.randn(3, 10, dtype=torch.float64)
    conditioned = model(x)
    with wc.disabled(model):
        base = model(x)
    assert not torch.allclose(base, conditioned)
    entered, release = threading.Event(), threading.Event()

    def body() -> torch.Tensor:
        with wc.disabled(model):
            entered.set()
            assert release.wait(10)
            return model(x)

    thread, result = in_thread(body, entered, release)
    try:
        torch.testing.assert_close(model(x), conditioned, rtol=0, atol=0)
    finally:
        release.set()
        thread.join(10)
    assert "error" not in result, result.get("error")
    torch.testing.assert_close(result["value"], base, rtol=0, atol=0)
    torch.testing.assert_close(model(x), conditioned, rtol=0, atol=0)


# PyTorch's own deprecations while Dynamo traces (see tests/test_compile.py)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be "
                            "instantiated:DeprecationWarning")
def test_a_compiled_model_follows_disabled_per_thread() -> None:
    """Dynamo guards on the thread-local switch: the compiled model computes its base inside
    ``disabled`` and stays conditioned in another thread meanwhile."""
    torch._dynamo.reset()
    model = conditioned_model()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 10, dtype=torch.float64)
    conditioned = model(x)
    with wc.disabled(model):
        base = model(x)
        torch.testing.assert_close(compiled(x), base, rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), conditioned, rtol=0, atol=0)
    entered, release = threading.Event(), threading.Event()

    def body() -> torch.Tensor:
        with wc.disabled(model):
            entered.set()
            assert release.wait(30)
            return compiled(x)

    thread, result = in_thread(body, entered, release)
    try:
        torch.testing.assert_close(compiled(x), conditioned, rtol=0, atol=0)
    finally:
        release.set()
        thread.join(30)
    assert "error" not in result, result.get("error")
    torch.testing.assert_close(result["value"], base, rtol=0, atol=0)


@contextlib.contextmanager
def counting_dense(layer: nn.Module) -> Iterator[list[int]]:
    """Counts the evaluations of the dense conditioned weight (the parametrization's
    forward), which only the dense path runs."""
    calls: list[int] = []
    handle = layer.parametrizations.weight[0].register_forward_hook(
        lambda *_: calls.append(threading.get_ident()))
    try:
        yield calls
    finally:
        handle.remove()


def test_dense_forward_in_one_thread_leaves_another_thread_matrix_free() -> None:
    model = conditioned_model()
    x = torch.randn(3, 10, dtype=torch.float64)
    entered, release = threading.Event(), threading.Event()

    def body() -> int:
        with wc.dense_forward(model):
            entered.set()
            assert release.wait(10)
            model(x)
            return threading.get_ident()

    with counting_dense(model.proj) as calls:
        thread, result = in_thread(body, entered, release)
        try:
            model(x)  # matrix-free: no dense weight in this thread
            main_calls = list(calls)
        finally:
            release.set()
            thread.join(10)
    assert "error" not in result, result.get("error")
    assert main_calls == [] and calls == [result["value"]]


def test_switches_nest_restore_and_act_on_the_module_passed() -> None:
    first, second = conditioned_model(), conditioned_model()
    x = torch.randn(3, 10, dtype=torch.float64)
    out1, out2 = first(x), second(x)
    with wc.disabled(first):
        base1 = first(x)
        assert not torch.allclose(base1, out1)
        torch.testing.assert_close(second(x), out2, rtol=0, atol=0)  # only `first`
        with wc.disabled(first):
            torch.testing.assert_close(first(x), base1, rtol=0, atol=0)
        torch.testing.assert_close(first(x), base1, rtol=0, atol=0)  # still disabled
    torch.testing.assert_close(first(x), out1, rtol=0, atol=0)

    def dense(layer: nn.Module) -> bool:
        with counting_dense(layer) as calls:
            layer(x)
        return bool(calls)

    with wc.dense_forward(first):
        assert dense(first.proj) and not dense(second.proj)
        with wc.dense_forward(first):
            assert dense(first.proj)
        assert dense(first.proj)  # still dense
    assert not dense(first.proj)


# -- 5. condition(): what is targeted ---------------------------------------------------------
MODEL_ERRORS = [
    ("empty-list", dict(target_modules=[]), wc.OptionError,
     r"condition: argument 'target_modules' expected 'all-linear', a regular expression or a "
     r"non-empty list of module names, got \[\]"),
    ("none", dict(target_modules=None), wc.OptionError,
     r"condition: argument 'target_modules' expected .*, got None"),
    ("int", dict(target_modules=5), wc.OptionError,
     r"condition: argument 'target_modules' expected .*, got 5"),
    ("exclude-int", dict(target_modules=["proj"], exclude_modules=5), wc.OptionError,
     r"condition: argument 'exclude_modules' expected 'all-linear', a regular expression or "
     r"a list of module names, got 5"),
    ("overrides-list", dict(target_modules=["proj"], overrides=[("proj", {})]), wc.OptionError,
     r"condition: argument 'overrides' expected a mapping of pattern to a dict of options, "
     r"got \[\('proj', \{\}\)\]"),
    ("overrides-value", dict(target_modules=["proj"], overrides={"proj": 5}), wc.OptionError,
     r"condition: argument 'overrides' expected a mapping of pattern to a dict of options, "
     r"got 5 for 'proj'"),
]


@pytest.mark.parametrize("case", MODEL_ERRORS, ids=[c[0] for c in MODEL_ERRORS])
def test_condition_refuses_what_targets_nothing(case) -> None:
    _, kwargs, error, pattern = case
    model = Wrapped(make_layer(8, 8))
    before = snapshot(model.proj)
    with pytest.raises(error, match=pattern):
        wc.condition(model, "lora", **kwargs)
    assert_untouched(model.proj, before)


def test_condition_takes_any_iterable_of_names() -> None:
    model = Wrapped(make_layer(8, 8))
    report = wc.condition(model, "lora", target_modules=(n for n in ["proj"]))
    assert list(report.layers) == ["proj"]


@pytest.mark.parametrize("call", ["disabled", "dense_forward", "set_adapter", "adapter_names"])
def test_model_functions_refuse_what_is_not_a_module(call: str) -> None:
    run = {"disabled": lambda: wc.disabled("model").__enter__(),
           "dense_forward": lambda: wc.dense_forward("model").__enter__(),
           "set_adapter": lambda: wc.set_adapter("model", "default"),
           "adapter_names": lambda: wc.adapter_names("model")}[call]
    argument = "module" if call == "dense_forward" else "model"
    with pytest.raises(wc.LayerTypeError, match=rf"{call}: argument '{argument}' expected an "
                       rf"nn.Module, got str"):
        run()


# -- 6. pickling ------------------------------------------------------------------------------
@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_pickling_a_conditioned_model_names_the_supported_ways(save: str) -> None:
    model = conditioned_model()
    x = torch.randn(3, 10, dtype=torch.float64)
    expected = model(x)
    dump = {"pickle": pickle.dumps, "torch.save": lambda m: torch.save(m, io.BytesIO())}[save]
    with pytest.raises(wc.StateError, match=r"pickle: argument 'module' expected a module "
                       r"without conditioned layers, got a conditioned Linear; save "
                       r"model.state_dict\(\) .*weightcond.save_adapter"):
        dump(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    twin = copy.deepcopy(model)  # deepcopy is not pickling: it keeps working
    torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
    wc.merge(twin)
    pickle.loads(pickle.dumps(twin))  # a merged model is plain again
    assert wc.is_conditioned(model.proj)


class _FailsToInitialize(wc.transforms.Transform):
    """A norm-tied transform whose initialisation fails (user code), for the rollback."""

    norm_tied = True

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.magnitude = torch.nn.Parameter(torch.ones(dim))

    def diagonal(self, norms=None):
        return self.magnitude

    def initialize(self, norms: torch.Tensor) -> None:
        raise ValueError("user code failed")


@pytest.mark.parametrize("before", ["plain", "other-adapter", "same-adapter"])
def test_a_preset_whose_conditioner_fails_to_attach_leaves_the_layer_as_it_was(before) -> None:
    """apply_preset attached the update and the conditioners one by one, with no rollback:
    a failure in the last left the first ones registered."""
    from weightcond.presets import ConditionerSpec, Preset

    layer = torch.nn.Linear(8, 6)
    if before == "other-adapter":
        wc.apply_preset(layer, "lora", rank=2, adapter_name="first")
    elif before == "same-adapter":
        wc.register_conditioning(layer, side="right", transform="diag")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    tensors = [id(t) for t in layer.parameters()]
    cls = type(layer)
    names = wc.adapter_names(layer)
    active = layer.parametrizations.weight[0].active if before != "plain" else None
    preset = Preset(name="failing", formula="", update=True, conditioners=(
        ConditionerSpec("pre", "left", "diag"),
        ConditionerSpec("post", "left", _FailsToInitialize)))
    with pytest.raises(ValueError, match="user code failed"):
        wc.apply_preset(layer, preset, rank=2)
    assert type(layer) is cls
    assert [id(t) for t in layer.parameters()] == tensors
    assert layer.state_dict().keys() == state.keys()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    assert wc.adapter_names(layer) == names
    if before == "plain":
        assert not wc.is_conditioned(layer)
    else:
        assert layer.parametrizations.weight[0].active == active
        assert [c.transform.name for c in wc.conditioners(layer)] == \
            (["diag"] if before == "same-adapter" else [])
        assert (wc.get_update(layer) is None) == (before == "same-adapter")
