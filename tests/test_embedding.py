"""``nn.Embedding`` as a layer kind (Decision (Embedding's input is indices) in
``weightcond.reshape``): matrix-free equals the dense conditioned table's lookup for every
transform that can act on it, in float64, outputs and gradients; PEFT's LoRA and DoRA on an
embedding equal ours (outputs, every gradient, after AdamW steps); adapters round-trip
through PEFT's files; what cannot run is refused with a typed error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightcond as wc
from weightcond.engine import Form

from helpers import assert_matrix_free_equals_dense, randomize

NUM, DIM = 40, 12


def _embedding(dtype: torch.dtype = torch.float64, padding_idx: int | None = 3) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(NUM, DIM, padding_idx=padding_idx, dtype=dtype)


def _indices(shape=(3, 7), padding: bool = False) -> torch.Tensor:
    """Indices, without the padding index 3 unless ``padding`` (Decision (Embedding's input
    is indices): its gradients follow PEFT, not the dense table's lookup)."""
    x = torch.randint(4, NUM, shape, generator=torch.Generator().manual_seed(1))
    if padding:
        x[0, 0] = 3
    return x


_equal_dense = assert_matrix_free_equals_dense


LEFT = [name for name in wc.TRANSFORMS if name != "butterfly"] + ["butterfly"]
THIN = [name for name, cls in wc.TRANSFORMS.items()
        if cls.low_rank_size is not wc.Transform.low_rank_size]
OPTIONS = {"householder": {"reflections": 2}, "skew": {"rank": 2}, "block": {"block_size": 4},
           "butterfly": {"block_size": 4}}


@pytest.mark.parametrize("transform", LEFT)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_left_conditioners_act_on_the_looked_up_vectors(transform: str, placement: str) -> None:
    layer = _embedding()
    wc.register_update(layer, rank=3, alpha=6)
    wc.register_conditioning(layer, placement=placement, side="left", transform=transform,
                             **OPTIONS.get(transform, {}))
    randomize(layer)
    _equal_dense(layer, _indices())


@pytest.mark.parametrize("transform", THIN)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_thin_right_conditioners_fold(transform: str, placement: str) -> None:
    layer = _embedding()
    wc.register_update(layer, rank=3, alpha=6)
    wc.register_conditioning(layer, placement=placement, side="right", transform=transform,
                             **OPTIONS.get(transform, {}))
    wc.register_conditioning(layer, placement="post", side="left", transform="magnitude")
    randomize(layer)
    for tokens in (1, 21):  # folded even for one token: there are no vectors to rotate
        assert wc.explain(layer, tokens=tokens).forms[0] is Form.FOLD
    _equal_dense(layer, _indices())
    _equal_dense(layer, torch.tensor(5))  # one index, a 0-d input


@pytest.mark.parametrize("preset", ["lora", "dora", "pre_diag", "sora"])
def test_presets_equal_the_dense_lookup(preset: str) -> None:
    layer = _embedding()
    wc.apply_preset(layer, preset, rank=4)
    randomize(layer)
    _equal_dense(layer, _indices())
    merged = wc.merge(_copy_of(layer))
    assert type(merged) is nn.Embedding
    torch.testing.assert_close(merged(_indices()), layer(_indices()), rtol=1e-12, atol=1e-12)


def _copy_of(layer: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(layer)


@pytest.mark.parametrize("transform", [n for n in wc.TRANSFORMS if n not in THIN])
def test_right_conditioners_that_rotate_the_input_are_refused(transform: str) -> None:
    layer = _embedding()
    with pytest.raises(wc.OptionError, match=r"on the right of a layer whose input is indices "
                       r"\(Embedding\), not vectors to rotate, a transform with a low-rank "
                       r"form \('householder', 'skew'\), got '" + transform + "'"):
        wc.register_conditioning(layer, side="right", transform=transform,
                                 **OPTIONS.get(transform, {}))
    assert not wc.is_conditioned(layer)
    with pytest.raises(wc.OptionError, match="low-rank form"):
        wc.apply_preset(_embedding(), "oft")


@pytest.mark.parametrize("option, message", [
    ({"max_norm": 1.0}, "expected an Embedding without max_norm, got one with max_norm"),
    ({"sparse": True}, "expected an Embedding without sparse=True, got one with sparse=True")])
def test_embeddings_that_change_under_lookup_are_refused(option, message: str) -> None:
    layer = nn.Embedding(NUM, DIM, **option)
    with pytest.raises(wc.StateError, match=message):
        wc.apply_preset(layer, "lora", rank=2)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(NUM, DIM, padding_idx=3, dtype=torch.float64)
        self.head = nn.Linear(DIM, 5, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x))).sum(1)


@pytest.mark.parametrize("use_dora", [False, True])
def test_equal_to_peft_lora_and_dora_through_training(use_dora: bool) -> None:
    """PEFT's own Embedding LoRA / DoRA against ours from the same values: outputs and every
    gradient, then five AdamW steps (PEFT zeroes the padding row's gradient through its
    lookup; so does ours)."""
    peft = pytest.importorskip("peft")
    x = _indices((4, 9), padding=True)
    theirs = peft.get_peft_model(_Model(), peft.LoraConfig(
        target_modules=["embed"], r=4, lora_alpha=8, use_dora=use_dora))
    inner = theirs.base_model.model.embed
    with torch.no_grad():
        inner.lora_embedding_B["default"].normal_()  # PEFT starts B at zero; A random
    ours = _Model()
    wc.condition(ours, "dora" if use_dora else "lora", target_modules=["embed"], rank=4, alpha=8)
    update = wc.get_update(ours.embed)
    with torch.no_grad():
        update.A.copy_(inner.lora_embedding_A["default"])
        update.B.copy_(inner.lora_embedding_B["default"])
        if use_dora:
            wc.conditioners(ours.embed)[0].transform.magnitude.copy_(
                inner.lora_magnitude_vector["default"].weight)
    params = {"theirs": [p for p in theirs.parameters() if p.requires_grad],
              "ours": [p for p in ours.parameters() if p.requires_grad]}
    optimizers = {k: torch.optim.AdamW(v, lr=1e-2) for k, v in params.items()}
    models = {"theirs": theirs, "ours": ours}
    for _ in range(5):
        losses = {}
        for key, model in models.items():
            optimizers[key].zero_grad()
            losses[key] = model(x).square().mean()
            losses[key].backward()
        torch.testing.assert_close(losses["ours"], losses["theirs"], rtol=1e-10, atol=0)
        grads = {k: sorted((tuple(p.shape), p.grad) for p in v) for k, v in params.items()}
        grads = {k: [g for _, g in sorted(v, key=lambda sg: (sg[0], float(sg[1].sum())))]
                 for k, v in grads.items()}
        for ours_g, theirs_g in zip(grads["ours"], grads["theirs"], strict=True):
            torch.testing.assert_close(ours_g, theirs_g, rtol=1e-9, atol=1e-12)
        assert torch.all(update.A.grad[:, 3] == 0)  # the padding index's column
        for optimizer in optimizers.values():
            optimizer.step()


def test_peft_files_round_trip(tmp_path) -> None:
    """to_peft writes PEFT's Embedding keys (lora_embedding_A/B), PEFT loads them and gives
    our outputs; from_peft reads PEFT's own save back to equal outputs."""
    peft = pytest.importorskip("peft")
    ours = _Model()
    wc.condition(ours, "dora", target_modules=["embed", "head"], rank=4)
    randomize(ours)
    x = _indices(padding=True)
    wc.to_peft(ours, tmp_path / "exported")
    loaded = peft.PeftModel.from_pretrained(_Model(), tmp_path / "exported")
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-12, atol=1e-12)
    loaded.save_pretrained(tmp_path / "resaved")
    back = _Model()
    wc.from_peft(back, tmp_path / "resaved")
    torch.testing.assert_close(back(x), ours(x), rtol=1e-12, atol=1e-12)
