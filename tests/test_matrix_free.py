"""The fast path is really matrix-free: no tensor of ``out × in`` elements (or more) is
created during forward and backward of the paper's presets and the anchor presets."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import weightcond as wc
from weightcond.engine import Form

from helpers import make_layer, randomize


class NewTensors(TorchDispatchMode):
    """Sees every tensor an operator allocates (:meth:`record`); views of existing storage
    are not allocations."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.record(func, t)
        return out

    def record(self, func, t: torch.Tensor) -> None:
        raise NotImplementedError


class LargestNewTensor(NewTensors):
    """Records the largest tensor (by element count) that an operator allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, str] = (0, "")

    def record(self, func, t: torch.Tensor) -> None:
        self.largest = max(self.largest, (t.numel(), f"{func} -> {tuple(t.shape)}"))


# tokens < min(out, in): activations stay below out·in; 16 tokens fold thin rotations
# (Note (folded rotations): 16 · 4 >= 56), 2 do not. Large enough that the exp map's padded
# (2, 4k, 4k) block (Note (singleton matrix_exp)) stays below out·in at rotation rank 8
OUT, IN, TOKENS = 64, 56, 16


CASES = [("lora", {}), ("dora", {}), ("dora", {"detach_norm": False}), ("pre_diag", {}),
         ("sora", {}), ("sora", {"map": "first_order", "condition_bias": True}),
         ("sora", {"map": "exp"}), ("oft", {"block_size": 8}), ("boft", {"block_size": 4,
         "butterfly_factors": 2}), ("hra", {"reflections": 4}), ("goft", {})]


@pytest.mark.parametrize("tokens", [TOKENS, 2])
@pytest.mark.parametrize("preset, options", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("bias", [True, False])
def test_no_out_by_in_tensor_in_forward_and_backward(preset: str, options, bias: bool,
                                                      tokens: int) -> None:
    layer = make_layer(OUT, IN, bias=bias, dtype=torch.float32)
    if wc.PRESETS[preset].update:
        options = {"rank": 4, **options}
    wc.apply_preset(layer, preset, **options)
    randomize(layer)
    x = torch.randn(tokens, IN, requires_grad=True)
    with LargestNewTensor() as record:
        layer(x).square().sum().backward()
    size, where = record.largest
    assert size < OUT * IN, where


def test_the_recorder_sees_the_dense_path() -> None:
    """The check can fail: the dense forward does create an out × in tensor."""
    layer = make_layer(OUT, IN, dtype=torch.float32)
    wc.apply_preset(layer, "pre_diag", rank=4)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    with wc.dense_forward(layer), LargestNewTensor() as record:
        layer(x).square().sum().backward()
    assert record.largest[0] >= OUT * IN


class ThinProducts(TorchDispatchMode):
    """Records the layout of every matrix product with a thin output: ``(M, N)`` with
    ``N <= 8 < min(M, K)``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in {"mm", "addmm", "addmm_"}:
            a, b = args[-2:] if name == "mm" else args[1:3]
            m, k, n = a.shape[0], a.shape[1], b.shape[1]
            if n <= 8 < min(m, k):
                self.seen.append((tuple(out.shape), a.stride(), b.stride()))
        return out


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("transform, options", [("householder", {"reflections": 4}),
                                                ("skew", {"rank": 2})])
def test_thin_products_are_row_major_times_transposed(transform: str, options, side: str,
                                                      update: bool) -> None:
    """Note (thin GEMMs): a product with a thin output is ``A Bᵀ`` with ``A`` and ``B``
    row-major (``F.linear`` on a contiguous ``(k, n)`` factor), forward and backward."""
    layer = make_layer(OUT, IN, dtype=torch.float32)
    if update:
        wc.register_update(layer, rank=4)
    wc.register_conditioning(layer, side=side, transform=transform, **options)
    randomize(layer)
    x = torch.randn(TOKENS, IN)
    with ThinProducts() as record:
        layer(x).square().sum().backward()
    assert record.seen  # the folded path has thin products
    for shape, a_strides, b_strides in record.seen:
        assert a_strides[1] == 1 and b_strides[0] == 1, (shape, a_strides, b_strides)


# -- Note (rotate the weight or the activations) ----------------------------------------------
# out < tokens: a right pre chain of structured conditioners runs on W (out × in) when the
# input needs no gradient, on the activations (tokens × in) when it does
W_OUT, W_IN, W_TOKENS = 24, 40, 64
RIGHT_CHAINS = [
    [("block", {"block_size": 8})],
    [("butterfly", {"block_size": 4, "factors": 2})],
    [("givens", {})],
    [("orthogonal", {})],
    [("diag", {})],
    [("householder", {"reflections": 4}), ("block", {"block_size": 5}), ("diag", {})],
]


def _right_chain_layer(chain, update: bool) -> torch.nn.Linear:
    layer = make_layer(W_OUT, W_IN)
    if update:
        wc.register_update(layer, rank=3)
    for transform, options in chain:
        wc.register_conditioning(layer, placement="pre", side="right", transform=transform,
                                 **options)
    wc.register_conditioning(layer, placement="post", side="left", transform="diag")
    randomize(layer)
    return layer


def _fast_equals_dense(layer: torch.nn.Module, input_grad: bool):
    """Checks the fast output and gradients against the dense form's (float64); returns the
    largest new tensor of the fast forward and backward, and of the forward alone."""
    x = torch.randn(W_TOKENS, W_IN, dtype=torch.float64, requires_grad=input_grad)
    cotangent = torch.randn(W_TOKENS, W_OUT, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = [x, *params] if input_grad else params
    with LargestNewTensor() as forward:
        y = layer(x)
    with LargestNewTensor() as backward:
        grads = torch.autograd.grad(y, inputs, cotangent)
    with wc.dense_forward(layer):
        y_dense = layer(x)
        grads_dense = torch.autograd.grad(y_dense, inputs, cotangent)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(grads_dense) == len(inputs)
    for g, gd in zip(grads, grads_dense):
        torch.testing.assert_close(g, gd, rtol=1e-11, atol=1e-11)
    return max(forward.largest, backward.largest), forward.largest


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("chain", RIGHT_CHAINS, ids=lambda c: "+".join(t for t, _ in c))
@pytest.mark.parametrize("input_grad", [False, True])
def test_right_chain_on_the_weight_or_the_activations(chain, update: bool,
                                                      input_grad: bool) -> None:
    layer = _right_chain_layer(chain, update)
    size, where = _fast_equals_dense(layer, input_grad)[0]
    if input_grad:  # the activations are rotated: a (tokens, in) tensor exists
        assert size >= W_TOKENS * W_IN, where
    else:  # W R_pre (out, in) instead; nothing as large as the activations is created
        assert W_OUT * W_IN <= size < W_TOKENS * W_IN, where


@pytest.mark.parametrize("chain", RIGHT_CHAINS, ids=lambda c: "+".join(t for t, _ in c))
def test_same_bits_with_and_without_grad_mode(chain) -> None:
    """The form depends on the input, not on ``torch.no_grad()``."""
    layer = _right_chain_layer(chain, update=True)
    for x in (torch.randn(W_TOKENS, W_IN, dtype=torch.float64),
              torch.randn(W_TOKENS, W_IN, dtype=torch.float64, requires_grad=True)):
        with torch.no_grad():
            y_no_grad = layer(x)
        assert torch.equal(layer(x).detach(), y_no_grad)


class NewTensorOps(NewTensors):
    """Records the operators that allocate a tensor of at least ``size`` elements."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.ops: set[str] = set()

    def record(self, func, t: torch.Tensor) -> None:
        if t.numel() >= self.size:
            self.ops.add(func.overloadpacket.__name__)


@pytest.mark.parametrize("input_grad", [False, True])
def test_weight_form_of_blocks_makes_no_layout_copy(input_grad: bool) -> None:
    """Note (block layouts): ``W Q`` is one ``bmm`` whose output the forward GEMM reads as
    it is (Block.rotated_linear), and the backward makes no copy of a weight-sized tensor
    either: only the GEMMs, the loss (pow, mul) and, with the input's gradient, its
    accumulation allocate that much."""
    allowed = {"bmm", "addmm", "mm", "pow", "mul"}
    transform, options = "block", {"block_size": 8}
    layer = make_layer(W_OUT, W_IN, dtype=torch.float32)
    wc.register_conditioning(layer, side="right", transform=transform, **options)
    randomize(layer)
    x = torch.randn(W_TOKENS, W_IN, requires_grad=input_grad)  # out < tokens: the weight form
    with NewTensorOps(W_OUT * W_IN) as record:
        layer(x).square().sum().backward()
    assert record.ops <= allowed, record.ops


@pytest.mark.parametrize("input_grad", [False, True])
def test_weight_form_saves_w_q_only_for_the_input_gradient(input_grad: bool) -> None:
    """``(W Q)ᵀ`` serves the backward only for the input's gradient: without it, the fused
    block saves none (one weight-sized tensor less held until the backward)."""
    layer = make_layer(W_OUT, W_IN, dtype=torch.float32)
    wc.register_conditioning(layer, side="right", transform="block", block_size=8)
    randomize(layer)
    x = torch.randn(W_TOKENS, W_IN, requires_grad=input_grad)
    weight = layer.parametrizations.weight.original
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert ((W_IN, W_OUT) in saved) == input_grad, saved


@pytest.mark.parametrize("map_name, share", [("cayley", False), ("exp", True)])
@pytest.mark.parametrize("input_grad, weight_grad", [(True, False), (False, False),
                                                      (True, True), (False, True)])
def test_fused_block_linear_equals_dense(map_name: str, share: bool, input_grad: bool,
                                         weight_grad: bool) -> None:
    """Note (the input gradient gives the blocks' gradient): an exactly orthogonal block
    alone on the right computes the GEMM itself; with the input's gradient its blocks'
    gradient comes from that gradient (no rotated activations in the forward), and every
    gradient (input, blocks, bias, an unfrozen weight) equals the dense form's."""
    layer = make_layer(W_OUT, W_IN)
    block = wc.register_conditioning(layer, side="right", transform="block", block_size=8,
                                     map=map_name, share=share).transform
    randomize(layer)
    layer.parametrizations.weight.original.requires_grad_(weight_grad)
    layer.bias.requires_grad_(True)
    assert block.fuses_linear
    assert len([p for p in layer.parameters() if p.requires_grad]) >= 2
    forward = _fast_equals_dense(layer, input_grad)[1]
    assert forward[0] < W_TOKENS * W_IN, forward  # the weight form


def test_inexact_block_maps_do_not_fuse() -> None:
    """The fused backward rests on Q⁻¹ = Qᵀ; the first-order and Neumann maps rotate the
    activations instead (and still equal the dense form)."""
    for map_name in ("first_order", "cayley_neumann"):
        layer = make_layer(W_OUT, W_IN)
        block = wc.register_conditioning(layer, side="right", transform="block",
                                         block_size=8, map=map_name).transform
        randomize(layer)
        assert not block.fuses_linear
        x = torch.randn(W_TOKENS, W_IN, dtype=torch.float64, requires_grad=True)
        for input_grad in (False, True):  # the planner prices the other forms
            plan = wc.explain(layer, tokens=W_TOKENS, input_grad=input_grad)
            assert [o for o, _ in plan.options[0]] == [Form.ACTIVATION, Form.WEIGHT], plan
        y = layer(x)
        with wc.dense_forward(layer):
            torch.testing.assert_close(y, layer(x))


# -- the layer as one autograd node (Note (one node for the layer) in engine/kernels.py) -------

NODE_IN, NODE_OUT = 5, 4


@pytest.mark.parametrize("tokens", [3, 9])  # fewer and more tokens than inputs: g ⊙ d or D W
@pytest.mark.parametrize("diag, terms, vector, bias, post", [
    (False, True, False, True, False), (False, True, True, False, False),
    (True, True, False, False, False), (True, True, True, False, False),
    (True, False, True, False, False), (True, False, False, False, False),
    (True, True, False, False, True), (True, True, True, False, True)])
def test_layer_node_gradients(tokens: int, diag: bool, terms: bool, vector: bool,
                              bias: bool, post: bool) -> None:
    """Every gradient of ``(x Wᵀ) ⊙ d + (x Lᵀ) R + v (+ b)`` and, with ``post``, of
    ``((x Wᵀ) + (x Lᵀ) R) ⊙ d + v``, the frozen weight's too, against finite differences in
    float64."""
    from weightcond.engine.kernels import LinearNode as _LinearNode

    g = torch.Generator().manual_seed(tokens)

    def arg(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    args = (arg(tokens, NODE_IN), arg(NODE_OUT, NODE_IN), arg(NODE_OUT) if bias else None,
            arg(NODE_OUT) if diag else None, arg(2, NODE_IN) if terms else None,
            arg(2, NODE_OUT) if terms else None, arg(NODE_OUT) if vector else None, post)
    assert torch.autograd.gradcheck(_LinearNode.apply, args)


@pytest.mark.parametrize("tokens", [3, 24])
@pytest.mark.parametrize("preset, options", [
    ("lora", {}), ("pre_diag", {}), ("sora", {"rotation_rank": 1}),
    ("sora", {"rotation_rank": 1, "condition_bias": True}), ("dora", {}),
    ("dora", {"detach_norm": False})], ids=lambda c: str(c))
def test_presets_run_as_one_node_with_the_step_list_bits(monkeypatch, preset: str, options,
                                                         tokens: int) -> None:
    """LoRA, Pre-Diag, SORA (its rotation folded) and DoRA run their layer as one node, whose
    forward gives the bits of the step list (:func:`weightcond.engine.execute.run_steps`) and
    whose gradients equal its gradients."""
    import weightcond.engine.execute as execute

    results = {}
    for node in (True, False):
        torch.manual_seed(0)
        layer = make_layer(8, 6, dtype=torch.float64)
        wc.apply_preset(layer, preset, rank=2, **options)
        randomize(layer)
        if not node:
            monkeypatch.setattr(execute, "_one_node", lambda *args: None)
        x = torch.randn(tokens, 6, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        producer = y.grad_fn.next_functions[0][0]  # under the output's reshape
        assert ("LinearNode" in type(producer).__name__) == node, producer
        params = [x, *(p for p in layer.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(y, params, torch.randn_like(y))
        results[node] = (y, grads)
        with torch.no_grad():
            y32 = layer.float()(x.float())
        results[node] += (y32,)
    (y, grads, y32), (y_list, grads_list, y32_list) = results[True], results[False]
    assert torch.equal(y, y_list) and torch.equal(y32, y32_list)
    for a, b in zip(grads, grads_list):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
