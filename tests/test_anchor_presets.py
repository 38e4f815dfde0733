"""The existing orthogonal methods as presets: OFT and HRA equal PEFT, GOFT equals a dense
product of plane rotations, and the Neumann approximation converges to the exact Cayley."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import HRAConfig, OFTConfig, get_peft_model

import weightcond as wc
from weightcond.transforms import maps

from helpers import Wrapped, make_layer


def compare(peft_model, ours, peft_params, our_params, grad_scale: float, x) -> None:
    """Outputs, gradients (ours × grad_scale == PEFT's) and merged weights agree."""
    y_peft, y_ours = peft_model(x), ours(x)
    torch.testing.assert_close(y_ours, y_peft)
    y_peft.square().sum().backward()
    y_ours.square().sum().backward()
    for p_peft, p_ours in zip(peft_params, our_params):
        torch.testing.assert_close(p_ours.grad * grad_scale, p_peft.grad)
    merged = peft_model.merge_and_unload().proj
    wc.merge(ours)
    torch.testing.assert_close(ours.weight, merged.weight)
    torch.testing.assert_close(ours.bias, merged.bias)


@pytest.mark.parametrize("share", [False, True])
def test_oft_equals_peft_exact_cayley(share: bool) -> None:
    """Our generator is PEFT's ``oft_R`` (``scale=2``): PEFT's ``(I - Q)(I + Q)⁻¹`` on row
    vectors is our ``cayley(2Q)`` on columns; equal gradients, not only outputs."""
    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), OFTConfig(
        r=0, oft_block_size=4, target_modules=["proj"], use_cayley_neumann=False,
        block_share=share))
    rotation = peft_model.base_model.model.proj.oft_R["default"]
    applied = wc.apply_preset(ours, "oft", block_size=4, block_share=share)
    block = applied.conditioners[0].transform
    with torch.no_grad():
        rotation.weight.normal_(std=0.3)
        block.generator.copy_(rotation.weight)
    assert block.generator.shape == rotation.weight.shape
    compare(peft_model, ours, [rotation.weight], [block.generator], 1.0,
            torch.randn(3, 5, 16, dtype=torch.float64))


@pytest.mark.parametrize("terms", [2, 3, 4, 5, 6, 9])
def test_oft_neumann_equals_peft_neumann_term_for_term(terms: int) -> None:
    """PEFT's default OFT (``use_cayley_neumann=True``): its series (last power with weight
    1; 3 and 4 terms alike) applied to the generator of the inverse of its exact path, which
    is our ``map="cayley_neumann"`` with ``scale=-2`` and the generator ``oft_R``. Outputs,
    gradients and merged weight at a generator large enough that any other series differs
    (regression: the last term had weight 2, 116 % of the adapter's effect at 0.2)."""
    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), OFTConfig(
        r=0, oft_block_size=4, target_modules=["proj"], num_cayley_neumann_terms=terms))
    assert peft_model.peft_config["default"].use_cayley_neumann  # PEFT's default
    rotation = peft_model.base_model.model.proj.oft_R["default"]
    block = wc.apply_preset(ours, "oft", block_size=4, map="cayley_neumann", scale=-2.0,
                            neumann_terms=terms).conditioners[0].transform
    with torch.no_grad():
        rotation.weight.normal_(std=0.2)
        block.generator.copy_(rotation.weight)
    compare(peft_model, ours, [rotation.weight], [block.generator], 1.0,
            torch.randn(3, 5, 16, dtype=torch.float64))


def test_our_neumann_converges_to_our_exact_cayley() -> None:
    torch.manual_seed(0)
    x = 0.1 * torch.randn(6, 6, dtype=torch.float64)  # ‖S/2‖ < 1: the series converges
    s = x - x.T
    exact = maps.cayley(s)
    errors = [(maps.cayley_neumann(s, terms) - exact).abs().max().item() for terms in
              (2, 4, 8, 16, 32)]
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-12


def test_neumann_series_terms() -> None:
    """I + 2X + … + 2X^{p-1} + X^p with X = S/2, p = max(terms - 1, 3) (PEFT's terms)."""
    x = 0.3 * torch.randn(5, 5, dtype=torch.float64)
    s = x - x.T
    h, eye = s / 2, torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(maps.cayley_neumann(s, 1), eye)
    torch.testing.assert_close(maps.cayley_neumann(s, 2), eye + 2 * h)
    for terms in (3, 4):
        torch.testing.assert_close(maps.cayley_neumann(s, terms),
                                   eye + 2 * h + 2 * h @ h + h @ h @ h)
    torch.testing.assert_close(maps.cayley_neumann(s, 6),
                               eye + 2 * sum(torch.matrix_power(h, j) for j in range(1, 5))
                               + torch.matrix_power(h, 5))


def test_oft_neumann_option_builds_the_truncated_series() -> None:
    layer = make_layer(8, 8)
    block = wc.apply_preset(layer, "oft", block_size=4, map="cayley_neumann",
                            neumann_terms=3).conditioners[0].transform
    with torch.no_grad():
        block.generator.normal_(std=0.2)
    s = torch.zeros(2, 4, 4, dtype=torch.float64)
    rows, cols = torch.triu_indices(4, 4, 1)
    s[:, rows, cols] = block.generator.detach()
    s = 2 * (s - s.mT)  # the preset's scale
    expected = torch.block_diag(*maps.cayley_neumann(s, 3))
    torch.testing.assert_close(block.matrix().detach(), expected)
    assert not block.is_orthogonal


def trainable_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def train_both(peft_model, ours, optimizer, lr: float, steps: int = 10) -> None:
    """The same optimizer steps on a regression loss; after each, equal losses and outputs."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    models = (peft_model, ours)
    assert [p.numel() for p in trainable_of(ours)] and \
        sum(p.numel() for p in trainable_of(ours)) == \
        sum(p.numel() for p in trainable_of(peft_model))  # the same trainable count
    opts = [optimizer(trainable_of(m), lr=lr) for m in models]
    moved = 0.0
    for _ in range(steps):
        losses = []
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-9)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-9, atol=1e-9)
            moved = (peft_model(x) - x @ peft_model.base_model.model.proj.base_layer.weight.T
                     - peft_model.base_model.model.proj.base_layer.bias).abs().max().item()
    assert moved > 1e-2  # the adapter did move the outputs


OPTIMIZERS = [(torch.optim.AdamW, 2e-3), (torch.optim.Adam, 5e-2), (torch.optim.SGD, 0.5)]


@pytest.mark.parametrize("optimizer, lr", OPTIMIZERS, ids=["adamw", "adam", "sgd"])
@pytest.mark.parametrize("neumann", [False, True])
def test_oft_trains_like_peft(optimizer, lr: float, neumann: bool) -> None:
    """Regression: the generator was 2 × oft_R, so under Adam the same learning rate moved
    it at another rate (final loss 0.98138 against 0.99836 after 10 steps)."""
    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), OFTConfig(
        r=0, oft_block_size=4, target_modules=["proj"], use_cayley_neumann=neumann))
    options = {"map": "cayley_neumann", "scale": -2.0} if neumann else {}
    wc.apply_preset(ours, "oft", block_size=4, **options)
    train_both(peft_model, ours, optimizer, lr)


@pytest.mark.parametrize("optimizer, lr", OPTIMIZERS, ids=["adamw", "adam", "sgd"])
@pytest.mark.parametrize("method", ["lora", "dora", "hra"])
def test_lora_dora_hra_train_like_peft(method: str, optimizer, lr: float) -> None:
    """From PEFT's own (random) initial values, copied into ours: the same trajectory."""
    from peft import LoraConfig

    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    if method == "hra":
        config = HRAConfig(r=4, target_modules=["proj"])
        applied = wc.apply_preset(ours, "hra", reflections=4)
        pairs = [("hra_u", applied.conditioners[0].transform.U)]
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                            use_dora=method == "dora", init_lora_weights="gaussian")
        applied = wc.apply_preset(ours, method, rank=4, alpha=8)
        pairs = [("lora_A", applied.update.A), ("lora_B", applied.update.B)]
        if method == "dora":
            pairs.append(("lora_magnitude_vector", applied.conditioners[0].transform.magnitude))
    peft_model = get_peft_model(Wrapped(base), config)
    found = peft_tensors(peft_model, [name for name, _ in pairs])
    with torch.no_grad():
        for name, ours_param in pairs:
            if name == "lora_B":  # B = 0 at init in both: move it, or SGD's first steps are A's
                found[name] = 0.1 * torch.randn_like(found[name])
                peft_model.base_model.model.proj.lora_B["default"].weight.copy_(found[name])
            ours_param.copy_(found[name])
    train_both(peft_model, ours, optimizer, lr)


@pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension")  # PEFT BOFT on CPU
@pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1")
@pytest.mark.parametrize("optimizer, lr", OPTIMIZERS, ids=["adamw", "adam", "sgd"])
def test_boft_trains_like_peft(optimizer, lr: float) -> None:
    """Regression: ours trained 11,520 parameters where PEFT trains 23,040 (its full
    blocks); now the full blocks are ours too (``full_blocks=True``)."""
    from peft import BOFTConfig

    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["proj"]))
    wc.apply_preset(ours, "boft", block_size=4)
    train_both(peft_model, ours, optimizer, lr)


@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_hra_equals_peft(gram_schmidt: bool) -> None:
    base = make_layer(10, 12)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), HRAConfig(r=6, target_modules=["proj"],
                                                       apply_GS=gram_schmidt))
    u_peft = peft_model.base_model.model.proj.hra_u["default"]
    house = wc.apply_preset(ours, "hra", reflections=6,
                            gram_schmidt=gram_schmidt).conditioners[0].transform
    with torch.no_grad():
        u_peft.normal_()
        house.U.copy_(u_peft)
    compare(peft_model, ours, [u_peft], [house.U], 1.0, torch.randn(4, 12, dtype=torch.float64))


def test_goft_is_the_givens_transform_on_the_input_side() -> None:
    layer = make_layer(6, 8)
    w = layer.weight.clone()
    givens = wc.apply_preset(layer, "goft").conditioners[0].transform
    with torch.no_grad():
        givens.angles.normal_()
    assert givens.rounds == 3  # log2(8): every coordinate mixes with every other
    torch.testing.assert_close(layer.weight, w @ givens.matrix())


def peft_tensors(peft_model, names):
    layer = peft_model.base_model.model.proj
    out = {}
    for name in names:
        module = getattr(layer, name)["default"]
        out[name] = module if isinstance(module, torch.Tensor) else module.weight
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension")
@pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1")
@pytest.mark.parametrize("method, config, names, peft_options", [
    ("lora", {"lora_alpha": 8}, ["lora_A", "lora_B"], {}),
    ("dora", {"lora_alpha": 8}, ["lora_A", "lora_B", "lora_magnitude_vector"],
     {"use_dora": True}),
    ("oft", {"use_cayley_neumann": False}, ["oft_R"], {}),
    ("oft", {"block_share": True, "use_cayley_neumann": False}, ["oft_R"],
     {"block_share": True}),
    ("oft", {}, ["oft_R"], {"use_cayley_neumann": True}),  # PEFT's default, not given
    ("hra", {}, ["hra_u"], {}),
    ("hra", {"apply_GS": True}, ["hra_u"], {"apply_GS": True}),
    ("boft", {}, ["boft_R", "boft_s"], {}),
])
def test_converter_loads_peft_tensors_with_equal_outputs(method, config, names,
                                                         peft_options) -> None:
    from peft import LoraConfig

    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    if method in ("lora", "dora"):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], **peft_options)
    elif method == "oft":
        cfg = OFTConfig(r=0, oft_block_size=4, target_modules=["proj"],
                        **{"use_cayley_neumann": False, **peft_options})
    elif method == "boft":
        from peft import BOFTConfig

        cfg = BOFTConfig(boft_block_size=4, target_modules=["proj"])
    else:
        cfg = HRAConfig(r=4, target_modules=["proj"], **peft_options)
    peft_model = get_peft_model(Wrapped(base), cfg)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    wc.interop.from_peft_tensors(ours, method, peft_tensors(peft_model, names), **config)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peft_model(x))


def test_converter_errors_leave_the_layer_alone() -> None:
    layer = make_layer(12, 16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(wc.UnknownNameError, match=r"argument 'method' expected one of"):
        wc.interop.from_peft_tensors(layer, "vera", {})
    with pytest.raises(wc.OptionError, match=r"argument 'tensors' expected the keys"):
        wc.interop.from_peft_tensors(layer, "lora", {"lora_A": torch.zeros(2, 16)})
    with pytest.raises(wc.ShapeError, match=r"tensor 'lora_B' expected shape \(12, 2\)"):
        wc.interop.from_peft_tensors(layer, "lora", {"lora_A": torch.zeros(2, 16),
                                                     "lora_B": torch.zeros(11, 2)})
    with pytest.raises(wc.UnknownNameError, match=r"unknown options \['r'\]"):
        wc.interop.from_peft_tensors(layer, "hra", {"hra_u": torch.zeros(16, 2)}, r=2)
    assert not wc.is_conditioned(layer) and type(layer) is torch.nn.Linear
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def boft_generator(d: torch.Tensor) -> torch.Tensor:
    """Our triangular generator (``full=False``) from PEFT's boft_R (full blocks D): the
    upper triangle of D - Dᵀ."""
    b = d.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return (d - d.mT)[..., rows, cols]


@pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension")  # PEFT BOFT on CPU
@pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1")
def test_boft_equals_peft() -> None:
    """On CPU PEFT builds BOFT with one butterfly factor (its multi-factor path needs a CUDA
    extension); outputs, gradients, merged weight and bias agree."""
    from peft import BOFTConfig

    base = make_layer(12, 16)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    d, scale = layer.boft_R["default"], layer.boft_s["default"]
    applied = wc.apply_preset(ours, "boft", block_size=4)
    butterfly, diag = (c.transform for c in applied.conditioners)
    with torch.no_grad():
        d.normal_(std=0.3)
        scale.add_(0.2 * torch.randn_like(scale))
        butterfly.generator.copy_(d)  # PEFT's full blocks (full_blocks=True)
        diag.scale.copy_(scale[:, 0])
    x = torch.randn(3, 16, dtype=torch.float64)
    y_peft, y_ours = peft_model(x), ours(x)
    torch.testing.assert_close(y_ours, y_peft)
    y_peft.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(butterfly.generator.grad, d.grad)
    torch.testing.assert_close(diag.scale.grad, scale.grad[:, 0])
    merged = peft_model.merge_and_unload().proj
    wc.merge(ours)
    torch.testing.assert_close(ours.weight, merged.weight)
    torch.testing.assert_close(ours.bias, merged.bias)


@pytest.mark.parametrize("block_size, factors", [(2, 2), (2, 3), (4, 2), (2, 4)])
def test_butterfly_equals_peft_boft_permutations_and_product(block_size, factors) -> None:
    """Several butterfly factors against PEFT's own permutation construction and product
    (built densely from its helpers, since its layer needs CUDA for factors > 1)."""
    from peft.tuners.boft.layer import BOFTLayer

    n = 16
    blocks = n // block_size
    d = 0.3 * torch.randn(factors, blocks, block_size, block_size, dtype=torch.float64)
    eye = torch.eye(block_size, dtype=torch.float64)
    k = 0.5 * (d - d.mT)
    q_peft = torch.linalg.solve(eye + k, eye - k, left=False)  # PEFT's cayley_batch
    rotation = torch.eye(n, dtype=torch.float64)
    for i in range(factors):
        perm = BOFTLayer.block_butterfly_perm(None, n, blocks // 2**i, block_size // 2,
                                              factors - 1)
        p = BOFTLayer.perm2mat(None, perm).double()
        rotation = p @ torch.block_diag(*q_peft[i]) @ p.T @ rotation
    ours = wc.TRANSFORMS["butterfly"](n, block_size=block_size, factors=factors).double()
    with torch.no_grad():
        ours.generator.copy_(boft_generator(d))
    # PEFT rotates row vectors, x @ R; ours acts on columns: Q = Rᵀ
    torch.testing.assert_close(ours.matrix().detach(), rotation.T)
