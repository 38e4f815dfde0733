"""Quantized frozen bases (weightcond.quantized): bitsandbytes 4- and 8-bit, torchao int8.

Every preset and every cell of the design space trains on them like the float layer that
holds the dequantized weight; the training step never dequantizes the weight itself (only
the library's own kernel does, inside the base's forward and input gradient); PEFT's LoRA
and DoRA on a bitsandbytes NF4 layer are equal to ours; merge gives a float layer or, with
``requantize=True``, the same quantized kind.
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import weightcond as wc
from weightcond.quantized import import_bitsandbytes, quantized_bytes
from weightcond.reshape import layer_kind, stored_weight

from helpers import randomize

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
bnb, IMPORT_MESSAGES = import_bitsandbytes()

from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)

OUT, IN = 96, 128
KINDS = ["nf4", "fp4-nested", "nf4-unaligned", "int8", "torchao"]


def make_quantized(kind: str, out: int = OUT, inner: int = IN, *, bias: bool = True,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A quantized layer of ``kind`` from a random float layer."""
    torch.manual_seed(seed)
    if kind == "nf4-unaligned":  # in not a multiple of the block size
        inner = 72
    dense = nn.Linear(inner, out, bias=bias).to(dtype)
    if kind.startswith(("nf4", "fp4")):
        layer = bnb.nn.Linear4bit(inner, out, bias=bias, compute_dtype=dtype,
                                  quant_type=kind[:3], compress_statistics="nested" in kind)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                         quant_type=kind[:3],
                                         compress_statistics="nested" in kind)
        if bias:
            layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        return layer.to("cpu")
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(inner, out, bias=bias, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
        layer = layer.to("cpu")
        if bias:
            layer.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        return layer
    dense.requires_grad_(False)
    holder = nn.Sequential(dense)
    quantize_(holder, Int8DynamicActivationInt8WeightConfig() if kind == "torchao-dynamic"
              else Int8WeightOnlyConfig())
    return holder[0]


def dequantized_twin(layer: nn.Module) -> nn.Linear:
    """A float Linear holding the quantized layer's dequantized weight and its bias."""
    kind = layer_kind(layer, "test")
    matrix = kind.to_matrix(stored_weight(layer)).detach()
    twin = nn.Linear(matrix.shape[1], matrix.shape[0], bias=layer.bias is not None)
    twin = twin.to(kind.matrix_dtype(layer))
    with torch.no_grad():
        twin.weight.copy_(matrix)
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin.requires_grad_(False)


PRESETS = [("lora", {"rank": 4}), ("dora", {"rank": 4}), ("dora", {"rank": 4,
           "detach_norm": False}), ("pre_diag", {"rank": 4}), ("sora", {"rank": 4}),
           ("oft", {"block_size": 8}), ("boft", {"block_size": 4, "butterfly_factors": 2}),
           ("hra", {"reflections": 4}), ("goft", {})]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float) -> None:
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got.float() - want.float()).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("preset, options", PRESETS, ids=lambda c: str(c))
@pytest.mark.parametrize("kind", KINDS)
def test_presets_train_like_the_dequantized_float_layer(kind: str, preset: str,
                                                         options: dict) -> None:
    """Three AdamW steps on the quantized layer and on the float layer holding its
    dequantized weight, from the same point, with the same data: the same outputs, input
    gradients and parameter gradients at every step."""
    layer = make_quantized(kind)
    twin = dequantized_twin(layer)
    wc.apply_preset(layer, preset, **options)
    wc.apply_preset(twin, preset, **options)
    randomize(layer, 0.1)
    ours = [p for _, p in sorted(layer.named_parameters()) if p.requires_grad]
    theirs = [p for _, p in sorted(twin.named_parameters()) if p.requires_grad]
    assert len(ours) == len(theirs) > 0
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(p)
    opt_a, opt_b = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(24, twin.in_features, generator=gen, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = layer(x), twin(x2)
        _assert_close(y, y2, f"step {step} output", 1e-5)
        y.square().mean().backward()
        y2.square().mean().backward()
        _assert_close(x.grad, x2.grad, f"step {step} input gradient", 1e-5)
        for p, q in zip(ours, theirs):
            _assert_close(p.grad, q.grad, f"step {step} gradient", 1e-4)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    _assert_close(layer.weight, twin.weight, "the dense conditioned weight", 1e-6)


CELLS = [(name, placement, side) for name in wc.TRANSFORMS
         for placement in ("pre", "post") for side in ("left", "right")]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("input_grad", [True, False])
def test_every_cell_runs_matrix_free_on_4bit(cell: tuple[str, str, str],
                                             input_grad: bool) -> None:
    """Every transform at every placement and side, with an update, on an NF4 base: the
    matrix-free output and every gradient equal the dense conditioned weight's."""
    name, placement, side = cell
    layer = make_quantized("nf4", 64, 64)
    wc.register_update(layer, rank=4)
    wc.register_conditioning(layer, placement=placement, side=side, transform=name,
                             **wc.TRANSFORMS[name].example_options)
    randomize(layer, 0.1)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(40, 64, requires_grad=input_grad)
    y = layer(x)
    cot = torch.randn_like(y)
    inputs = params + ([x] if input_grad else [])
    grads = torch.autograd.grad(y, inputs, cot)
    with wc.dense_forward(layer):
        y2 = layer(x)
        grads2 = torch.autograd.grad(y2, inputs, cot)
    _assert_close(y, y2, "output", 2e-5)
    for g, g2 in zip(grads, grads2):
        _assert_close(g, g2, "gradient", 2e-4)


# -- the training step never builds the dense weight --------------------------------------------
_LIBRARIES = ("bitsandbytes", "torchao")


class DenseAllocations(TorchDispatchMode):
    """Records every allocation of ``out × in`` elements or more that weightcond made: one
    made inside the quantized library's own kernels, below the base's product (forward) or
    in the library's backward, is the base's business and is not recorded."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.size and \
                    t.untyped_storage().data_ptr() not in inputs and not self._excused():
                self.found.append(f"{func} -> {tuple(t.shape)}")
        return out

    @staticmethod
    def _excused() -> bool:
        frames = traceback.extract_stack()
        ours = [f for f in frames if "/weightcond/" in f.filename.replace("\\", "/")
                and "/tests/" not in f.filename]
        inside_library = any(lib in f.filename for f in frames for lib in _LIBRARIES)
        if not inside_library:
            return False
        # the innermost weightcond frame is the base's product, or there is none (the
        # library's backward, called by the autograd engine)
        return not ours or ours[-1].name == "product"


@pytest.mark.parametrize("preset, options", PRESETS, ids=lambda c: str(c))
@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao"])
def test_no_dense_weight_in_the_training_step(kind: str, preset: str, options: dict) -> None:
    layer = make_quantized(kind)
    wc.apply_preset(layer, preset, **options)
    randomize(layer, 0.1)
    x = torch.randn(16, IN, requires_grad=True)
    layer(x).square().sum().backward()  # a first step (lazy state)
    with DenseAllocations(OUT * IN) as record:
        layer(x).square().sum().backward()
    assert not record.found, record.found


def test_the_recorder_sees_a_dense_weight() -> None:
    """The check can fail: the dense form builds the conditioned weight."""
    layer = make_quantized("nf4")
    wc.apply_preset(layer, "dora", rank=4)
    x = torch.randn(16, IN, requires_grad=True)
    with wc.dense_forward(layer), DenseAllocations(OUT * IN) as record:
        layer(x).square().sum().backward()
    assert record.found


def test_row_norms_are_computed_once_at_registration() -> None:
    layer = make_quantized("nf4")
    stored = stored_weight(layer)
    assert "_weightcond_row_sq" not in stored.__dict__
    wc.apply_preset(layer, "dora", rank=4)
    found = stored.__dict__["_weightcond_row_sq"]
    want = dequantized_twin(layer).weight.double().square().sum(-1)
    _assert_close(found, want, "row norms", 1e-6)


# -- PEFT on a bitsandbytes NF4 layer ------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = True  # what PEFT reads to take its bitsandbytes layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_equal_to_peft_on_nf4(dora: bool, dtype: torch.dtype, tmp_path) -> None:
    """PEFT's LoRA/DoRA on bitsandbytes' Linear4bit (its ``lora.bnb.Linear4bit``), saved and
    imported with from_peft onto the same quantized model: equal outputs and gradients
    through three AdamW steps."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = Holder(make_quantized("nf4", dtype=dtype))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], use_dora=dora, init_lora_weights=False))
    assert isinstance(theirs.base_model.model.proj, PeftLinear4bit)
    if dtype != torch.float32:
        theirs = theirs.to(dtype)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    wc.from_peft(ours, tmp_path)
    names = {"lora_A": "update.A", "lora_B": "update.B",
             "lora_magnitude_vector": "magnitude"}
    mine = dict(ours.named_parameters())
    pairs = []
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            key = next(v for k, v in names.items() if k in name)
            pairs.append((p, next(q for n, q in mine.items() if n.endswith(key))))
    assert len(pairs) == (3 if dora else 2)
    opt_a = torch.optim.AdamW([p for p, _ in pairs], lr=1e-3)
    opt_b = torch.optim.AdamW([q for _, q in pairs], lr=1e-3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(32, IN, generator=gen).to(dtype).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = theirs(x), ours(x2)
        _assert_close(y2, y, f"step {step} output", tol)
        y.float().square().mean().backward()
        y2.float().square().mean().backward()
        _assert_close(x2.grad, x.grad, f"step {step} input gradient", tol)
        for p, q in pairs:
            _assert_close(q.grad, p.grad, f"step {step} gradient", 10 * tol)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()


# -- merge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "fp4-nested", "int8", "torchao"])
def test_merge_gives_a_float_layer_or_the_same_kind(kind: str) -> None:
    layer = make_quantized(kind)
    wc.apply_preset(layer, "sora", rank=4)
    randomize(layer, 0.1)
    x = torch.randn(8, IN)
    with torch.no_grad():
        y = layer(x)
        dense = layer.weight.detach().clone()
    merged = wc.merge(copy.deepcopy(layer))
    assert type(merged) is nn.Linear and merged.weight.dtype.is_floating_point
    assert torch.equal(merged.weight, dense)
    _assert_close(merged(x), y, "merged output", 1e-5)

    requantized = wc.merge(copy.deepcopy(layer), requantize=True)
    assert layer_kind(requantized, "test").name == layer_kind(layer, "test").name
    assert not wc.is_conditioned(requantized)
    # exactly the library's own quantization of W' with the layer's settings
    again = make_quantized(kind)
    with torch.no_grad():
        fresh = nn.Linear(IN, OUT).to(dense.dtype)
        fresh.weight.copy_(dense)
    kind_of = layer_kind(again, "test")
    kind_of.requantize(again, fresh.weight.detach())
    assert torch.equal(kind_of.to_matrix(stored_weight(requantized)),
                       kind_of.to_matrix(stored_weight(again)))
    assert quantized_bytes(requantized) == quantized_bytes(again)
    # one more rounding of the weight, of the size of a quantization step
    step = {"nf4": 0.2, "fp4-nested": 0.3, "int8": 0.02, "torchao": 0.02}[kind]
    _assert_close(requantized(x), y, "requantized output", step)


def test_merge_keeps_a_layer_without_the_adapter_quantized() -> None:
    model = nn.Sequential(make_quantized("nf4"), make_quantized("nf4", IN, OUT, seed=1))
    wc.apply_preset(model[0], "lora", rank=4, adapter_name="a")
    wc.apply_preset(model[1], "lora", rank=4, adapter_name="b")
    untouched = stored_weight(model[1])
    wc.merge(model, adapter_name="a")
    assert type(model[0]) is nn.Linear
    assert type(model[1]).__name__ == "Linear4bit" and model[1].weight is untouched


# -- model level ----------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.up = make_quantized(kind, 64, 32, seed=1)
        self.down = make_quantized(kind, 16, 64, seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao"])
def test_model_level_condition_save_load_disable(kind: str, tmp_path) -> None:
    model = Tiny(kind)
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = model(x)
    wc.condition(model, "dora", target_modules="all-linear", rank=4)
    wc.condition(model, "sora", target_modules="all-linear", rank=2, adapter_name="second")
    randomize(model, 0.2)
    with torch.no_grad():
        with wc.disabled(model):
            _assert_close(model(x), before, "disabled", 1e-6)
        second = model(x)
        wc.set_adapter(model, "default")
        first = model(x)
    assert not torch.allclose(first, second)
    wc.save_adapter(model, tmp_path / "a")
    fresh = Tiny(kind)
    wc.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        _assert_close(fresh(x), first, "loaded", 1e-6)
    # the adapter trained on the quantized model loads onto the float model of its weights
    floats = nn.Module()
    floats.up, floats.down = dequantized_twin(model.up), dequantized_twin(model.down)
    floats.forward = lambda h: floats.down(torch.relu(floats.up(h)))  # type: ignore
    wc.load_adapter(floats, tmp_path / "a")
    with torch.no_grad():
        _assert_close(floats(x), first, "loaded onto the float model", 1e-4)


@pytest.mark.parametrize("nested", [False, True])
def test_a_4bit_layer_packed_by_its_own_inference_forward(nested: bool) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel the first time the layer runs in
    eval mode without gradient (Note (bitsandbytes' CPU inference packing)); conditioned
    afterwards, the layer reads it unpacked and trains like the dequantized float layer."""
    layer = make_quantized("fp4-nested" if nested else "nf4")
    before = dequantized_twin(layer).weight
    x = torch.randn(8, IN)
    layer.eval()
    with torch.no_grad():
        packed_output = layer(x)
    assert stored_weight(layer).quant_state.packing_format_for_cpu  # the case under test
    layer.train()
    wc.apply_preset(layer, "dora", rank=4)
    twin = dequantized_twin(layer)
    # the packing rounded the blockwise scales to bfloat16: the weight moved by that only
    _assert_close(twin.weight, before, "the weight after packing", 2 ** -8)
    wc.apply_preset(twin, "dora", rank=4)
    with torch.no_grad():
        for p, q in zip(layer.parameters(), twin.parameters()):
            if p.requires_grad:
                q.copy_(p)
    _assert_close(layer.weight, twin.weight, "dense conditioned weight", 1e-6)
    _assert_close(layer(x), twin(x), "output", 1e-5)
    with wc.disabled(layer), torch.no_grad():  # the packed kernel computes in bfloat16
        _assert_close(layer(x), packed_output, "the base's output", 2 ** -7)


def test_quantized_bytes_are_those_of_the_quantized_storage() -> None:
    four = make_quantized("nf4", 256, 256, bias=False)
    eight = make_quantized("int8", 256, 256, bias=False)
    ao = make_quantized("torchao", 256, 256, bias=False)
    dense = 256 * 256 * 4
    assert quantized_bytes(four) <= 0.15 * dense
    assert quantized_bytes(eight) <= 0.27 * dense
    assert quantized_bytes(ao) <= 0.27 * dense


# -- what is refused -----------------------------------------------------------------------------
def test_dynamic_int8_activations_refuse_what_needs_the_input_gradient() -> None:
    layer = make_quantized("torchao-dynamic")
    with pytest.raises(wc.LayerTypeError, match="gives none"):
        wc.register_conditioning(layer, placement="pre", side="right", transform="skew")
    with pytest.raises(wc.LayerTypeError, match="detach_norm"):
        wc.apply_preset(layer, "dora", rank=4, detach_norm=False)
    assert not wc.is_conditioned(layer)
    wc.apply_preset(layer, "dora", rank=4)  # left side, detached norm: fine
    x = torch.randn(4, IN)
    layer(x).sum().backward()


def test_an_int8_layer_not_yet_quantized_is_refused() -> None:
    layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True)
    with pytest.raises(wc.LayerTypeError, match="int8 weights"):
        wc.apply_preset(layer, "lora", rank=4)


def test_the_hub_kernel_fetch_is_handled() -> None:
    """bitsandbytes was imported without a warning escaping (the suite turns warnings into
    errors), and what it logged about its CPU kernel was recorded, not lost."""
    assert all(isinstance(m, str) for m in IMPORT_MESSAGES)
    kind_names = [k for k in wc.reshape.LAYER_KINDS]
    assert kind_names.index("Linear4bit") < kind_names.index("Linear")


# PEFT 0.21 asks a quantized transformers 5 model is_gradient_checkpointing (deprecated there)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("config", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_a_transformers_model_loaded_quantized(config: str, tmp_path) -> None:
    """``from_pretrained(..., quantization_config=...)`` with bitsandbytes or torchao: every
    linear layer is a quantized kind, conditions, trains, saves its adapter and reloads it
    onto a fresh quantized copy with equal outputs; to_peft writes an adapter PEFT loads onto
    the quantized model with equal outputs."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # no dropout: the comparisons run in train mode (in eval mode without gradient, bitsandbytes
    # computes a float32 4-bit layer in bfloat16, Note (bitsandbytes' CPU inference packing))
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "base")
    if config == "bnb-nf4":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    elif config == "bnb-int8":
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = transformers.TorchAoConfig(Int8WeightOnlyConfig())

    def load() -> nn.Module:
        return transformers.BertModel.from_pretrained(  # from_pretrained gives eval mode
            tmp_path / "base", quantization_config=quantization, device_map="cpu").train()

    model = load()
    report = wc.condition(model, "lora", target_modules="all-linear", rank=4)
    kinds = {layer_kind(m, "test").name for name, m in model.named_modules()
             if name in report.layers}
    assert kinds == {{"bnb-nf4": "Linear4bit", "bnb-int8": "Linear8bitLt",
                      "torchao-int8": "Int8Linear"}[config]}
    ids = torch.randint(0, 100, (2, 8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids).last_hidden_state.square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    wc.save_adapter(model, tmp_path / "adapter")
    fresh = load()
    wc.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        _assert_close(fresh(input_ids=ids).last_hidden_state, want, "reloaded", 1e-6)
    wc.to_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "peft").train()
    with torch.no_grad():
        _assert_close(theirs(input_ids=ids).last_hidden_state, want, "PEFT", 1e-4)


@pytest.mark.parametrize("base, kind, step", [("nf4", "Linear4bit", 0.15),
                                              ("fp4", "Linear4bit", 0.25),
                                              ("int8", "Linear8bitLt", 0.02),
                                              ("torchao-int8", "Int8Linear", 0.02)])
def test_quantize_a_model_in_memory(base: str, kind: str, step: float) -> None:
    """quantize() replaces the plain Linear layers (not the skipped ones) by the base's
    kind; the model computes what it did, to the quantization's rounding."""
    from weightcond.quantized import quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 2))
    x = torch.randn(16, 64)
    with torch.no_grad():
        want = model(x)
    quantize(model, base, skip=lambda name, layer: layer.out_features == 2)
    assert [layer_kind(m, "test").name for m in (model[0], model[2], model[3])] == \
        [kind, kind, "Linear"]
    with torch.no_grad():
        _assert_close(model(x), want, "quantized output", step)
    wc.condition(model, "dora", target_modules=["0", "2"], rank=4)
    model(x).sum().backward()
    with pytest.raises(wc.StateError, match="not conditioned yet"):
        quantize(model, base)


def test_quantize_refuses_an_unknown_base() -> None:
    from weightcond.quantized import quantize

    with pytest.raises(wc.OptionError, match="expected one of 'nf4', 'fp4', 'int8'"):
        quantize(nn.Sequential(nn.Linear(4, 4)), "int4")


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_compare_on_a_quantized_base(base: str) -> None:
    """``weightcond compare --base``: MiniLM quantized before conditioning (every linear layer
    of the encoder; the head stays float), trained, the base's bytes in the results."""
    import dataclasses

    from weightcond.compare import Settings, run
    from weightcond.data import load_minilm

    settings = dataclasses.replace(Settings.quick(), presets=["dora"], steps=3,
                                   train_size=32, eval_size=16, base=base)
    results = run(settings)
    assert results["data"]["base"] == base
    assert [r["preset"] for r in results["runs"]] == ["dora"]
    assert all(0 <= r["accuracy"] <= 1 and r["losses"] for r in results["runs"])
    encoder = load_minilm()[1]
    linear = sum(m.weight.numel() * 4 for m in encoder.modules() if type(m) is nn.Linear)
    saved = {"nf4": 0.85, "int8": 0.7}[base] * linear  # at least this much less
    assert results["data"]["base_bytes"] <= quantized_bytes(encoder) - saved


def test_compare_refuses_an_unknown_base() -> None:
    from weightcond.compare import Settings

    settings = Settings.quick()
    settings.base = "int4"
    with pytest.raises(wc.UnknownNameError, match="'base' expected one of 'float', 'nf4'"):
        settings.check()
