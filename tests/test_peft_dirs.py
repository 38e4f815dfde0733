"""PEFT adapter directories: import with ``wc.from_peft``, export with ``wc.to_peft``.

Each direction is checked against the installed ``peft`` on real transformers models built
from small configs: equal outputs after import, and ``PeftModel.from_pretrained`` of an
export gives the outputs of the weightcond model.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import weightcond as wc

from helpers import randomize

peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

# peft and transformers warn about their own deprecations and the BOFT CUDA extension when
# they build a model here; those are not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean((-1, -2)))


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module) -> torch.Tensor:
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return model(IMAGES) if isinstance(base, ConvNet) else model(IDS).last_hidden_state


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move the PEFT adapter's parameters away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                    rank_pattern={"layer.1.attention.self.value": 2},
                                    alpha_pattern={"value": 3}),
    "lora-rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["key"],
                                           use_rslora=True),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "dense"],
                                    use_dora=True),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["query", "value"],
                                  use_cayley_neumann=False),
    # PEFT's default OFT: the Cayley-Neumann path with 5 terms (regression: imported with
    # another last term, 116 % of the adapter's effect at this perturbation)
    "oft-default": lambda: peft.OFTConfig(r=0, oft_block_size=8,
                                          target_modules=["query", "value"]),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=["query"]),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["value"]),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_from_peft_directory_equals_peft(name: str, tmp_path) -> None:
    peft_model = peft.get_peft_model(bert(), PEFT_CONFIGS[name]())
    perturb(peft_model)
    peft_model.eval()
    expected = run(peft_model)
    peft_model.save_pretrained(tmp_path)

    model = bert()
    layers = wc.from_peft(model, tmp_path)
    assert layers and set(layers) == {n for n, _ in wc.conditioned_layers(model)}
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)


def test_from_peft_rank_pattern_and_alpha_pattern_per_layer(tmp_path) -> None:
    peft_model = peft.get_peft_model(bert(), PEFT_CONFIGS["lora"]())
    peft_model.save_pretrained(tmp_path)
    model = bert()
    wc.from_peft(model, tmp_path)
    layers = dict(wc.conditioned_layers(model))
    value1 = wc.get_update(layers["encoder.layer.1.attention.self.value"])
    query0 = wc.get_update(layers["encoder.layer.0.attention.self.query"])
    assert (value1.rank, value1.alpha) == (2, 3.0)
    assert (query0.rank, query0.alpha) == (4, 8.0)


@pytest.mark.parametrize("preset, build, targets", [
    ("lora", bert, ["query", "value"]),
    ("dora", bert, ["query", "dense"]),
    ("lora", gpt2, ["c_attn", "c_proj"]),
    ("dora", gpt2, ["c_attn"]),
    ("lora", ConvNet, ["conv", "proj"]),
    ("dora", ConvNet, ["conv"]),
], ids=["bert-lora", "bert-dora", "gpt2-lora", "gpt2-dora", "conv-lora", "conv-dora"])
def test_to_peft_loads_in_peft_with_equal_outputs(preset, build, targets, tmp_path) -> None:
    model = build()
    wc.condition(model, preset, target_modules=targets, rank=4, alpha=8,
                 overrides={targets[0]: {"rank": 2, "alpha": 5}})
    randomize(model, scale=0.2)
    expected = run(model)
    folder = wc.to_peft(model, tmp_path / "export")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is (preset == "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(), folder).eval()
    torch.testing.assert_close(run(loaded), expected, atol=1e-5, rtol=1e-5)

    again = build()  # and back: the export imports to the same function
    wc.from_peft(again, folder)
    torch.testing.assert_close(run(again), expected, atol=1e-6, rtol=1e-6)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_to_peft_refuses_what_peft_cannot_express(tmp_path) -> None:
    model = bert()
    wc.condition(model, "sora", target_modules=["query"])
    with pytest.raises(wc.AdapterError, match=r"to_peft: layer 'encoder.layer.0.attention.self."
                       r"query' expected a conditioning PEFT can express \(the presets 'lora', "
                       r"'dora', 'oft', 'boft' or 'hra'\), got an update and conditioners "
                       r"\[pre/left diag, post/left skew\]"):
        wc.to_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    mixed = bert()
    wc.condition(mixed, "lora", target_modules=["query"])
    wc.remove_conditioning(mixed)
    wc.condition(mixed, "dora", target_modules=["value"], overrides={
        "layer.0.attention.self.value": {"preset": "lora"}})
    with pytest.raises(wc.AdapterError, match=r"PEFT stores one of LoRA and DoRA per adapter"):
        wc.to_peft(mixed, tmp_path / "y")


def _saved(tmp_path, name: str = "lora"):
    peft_model = peft.get_peft_model(bert(), PEFT_CONFIGS[name]())
    peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "adapter_config.json").unlink(),
     r"from_peft: argument 'path' expected a PEFT adapter directory, got .* without "
     r"adapter_config.json"),
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
     r"from_peft: .* has no adapter_model.safetensors \(found README.md, adapter_config.json, "
     r"adapter_model.bin\); only safetensors adapters are read: nothing is unpickled"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"),
     r"from_peft: adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-7]),
     r"from_peft: adapter_model.safetensors is not a readable safetensors file"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "peft_type": "IA3"})),
     r"from_peft: adapter_config.json expected peft_type one of 'LORA', 'OFT', 'HRA', 'BOFT', "
     r"got 'IA3'"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "bias": "all",
         "trainable_token_indices": [1, 2]})),
     r"from_peft: the PEFT adapter uses 'trainable_token_indices', 'bias', which weightcond "
     r"does not import"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "modules_to_save": "pooler"})),
     r"from_peft: adapter_config.json expected 'modules_to_save' to be null or a list of names, "
     r"got 'pooler'"),
    (lambda d: safetensors.torch.save_file(
        {**safetensors.torch.load_file(d / "adapter_model.safetensors"),
         "base_model.model.pooler.dense.weight": torch.zeros(32, 32)},
        d / "adapter_model.safetensors"),
     r"from_peft: unexpected tensor 'base_model.model.pooler.dense.weight' in "
     r"adapter_model.safetensors \(expected 'base_model.model.<module>.<boft_R\|.*>'\)"),
])
def test_from_peft_failures_leave_the_model_unchanged(damage, pattern, tmp_path) -> None:
    folder = _saved(tmp_path)
    damage(folder)
    model = bert()
    before = snapshot(model)
    with pytest.raises(wc.AdapterError, match=pattern):
        wc.from_peft(model, folder)
    assert not wc.conditioned_layers(model)
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_from_peft_onto_another_model_leaves_it_unchanged(tmp_path) -> None:
    folder = _saved(tmp_path)
    model = gpt2()
    before = snapshot(model)
    with pytest.raises(wc.AdapterError, match=r"from_peft: the PEFT adapter has tensors for "
                       r"modules the model does not have: 'encoder.layer.0.attention.self.query'"):
        wc.from_peft(model, folder)
    assert not wc.conditioned_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())

    small = bert()  # the right names, the wrong shape on the last layer: all rolled back
    with torch.no_grad():
        small.encoder.layer[1].attention.self.value = nn.Linear(32, 16)
    with pytest.raises(wc.AdapterError, match=r"from_peft: layer 'encoder.layer.1.attention."
                       r"self.value': from_peft_tensors\('lora'\): tensor 'lora_B' expected "
                       r"shape \(16, 2\), got \(32, 2\)"):
        wc.from_peft(small, folder)
    assert not wc.conditioned_layers(small)


def test_to_peft_patterns_do_not_match_a_longer_name(tmp_path) -> None:
    """PEFT matches a pattern key as ``(.*\\.)?(key)$``: the key for ``fc`` must not also
    give ``block.fc`` its rank or alpha."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 8))
    model.add_module("block", nn.Sequential())
    model.block.add_module("fc", nn.Linear(8, 8))
    model.add_module("other", nn.Linear(8, 8))
    wc.condition(model, "lora", target_modules="all-linear", rank=2, alpha=16,
                 overrides={"^fc$": {"rank": 4, "alpha": 2}})
    folder = wc.to_peft(model, tmp_path / "export")
    fresh = copy.deepcopy(model)
    wc.remove_conditioning(fresh)
    wc.from_peft(fresh, folder)
    layers = dict(wc.conditioned_layers(fresh))
    assert (wc.get_update(layers["fc"]).rank, wc.get_update(layers["fc"]).alpha) == (4, 2.0)
    assert (wc.get_update(layers["block.fc"]).rank,
            wc.get_update(layers["block.fc"]).alpha) == (2, 16.0)


@pytest.mark.parametrize("name", ["oft", "oft-default", "boft"])
def test_an_adapter_trained_with_peft_imports_with_equal_outputs_and_gradients(
        name: str, tmp_path) -> None:
    """PEFT trains (5 AdamW steps at lr 5e-2), saves; the import computes PEFT's outputs and
    gradients, and both train on identically for 3 more steps."""
    peft_model = peft.get_peft_model(bert(), PEFT_CONFIGS[name]())
    target = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad()
        loss = (run(model) - target).square().mean()
        loss.backward()
        opt.step()
        return loss.item()

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)

    peft_opt = optimizer(peft_model)
    for _ in range(5):
        step(peft_model, peft_opt)
    moved = (run(peft_model) - run(bert())).abs().max().item()
    peft_model.save_pretrained(tmp_path)
    model = bert()
    wc.from_peft(model, tmp_path)
    torch.testing.assert_close(run(model), run(peft_model), atol=1e-5, rtol=1e-5)
    assert moved > 0.02  # the adapter did train (LayerNorm keeps the outputs near 1)
    ours_opt, peft_opt = optimizer(model), optimizer(peft_model)  # fresh moments on both
    for _ in range(3):
        assert step(model, ours_opt) == pytest.approx(step(peft_model, peft_opt), rel=1e-4)
    torch.testing.assert_close(run(model), run(peft_model), atol=1e-4, rtol=1e-4)


# -- issue 20: OFT, BOFT and HRA exports, classification heads, exact targets -----------------
def peft_load(build, folder, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(), folder, **kwargs)


class Twin(nn.Module):
    """Two linear layers with different input sizes (8, 16) and equal output sizes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cat([self.fc1(x), x], -1))


TWIN_X = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))


def full_blocks(model: nn.Module) -> None:
    """OFT with full b × b blocks (S = 2·(D - Dᵀ)), which PEFT stores as triangles."""
    model.requires_grad_(False)
    for name in ("query", "value"):
        for layer in (model.encoder.layer[0].attention.self, model.encoder.layer[1].attention.self):
            wc.register_conditioning(getattr(layer, name), side="right", transform="block",
                                     block_size=4, full=True, scale=2.0)


# (id, preset or a function conditioning the model, targets, options, PEFT's
#  parametrization: outputs, gradients, trainable count and trajectory are PEFT's, not only
#  the function)
EXPORTS = [
    ("oft", "oft", ["query", "value"], {"block_size": 4}, True),
    ("oft-share", "oft", ["query"], {"block_size": 8, "block_share": True}, True),
    ("oft-neumann", "oft", ["query", "value"],
     {"block_size": 4, "map": "cayley_neumann", "scale": -2.0}, True),
    ("oft-neumann-3-share", "oft", ["value"], {"block_size": 4, "map": "cayley_neumann",
                                               "scale": -2.0, "neumann_terms": 3,
                                               "block_share": True}, True),
    # converted exactly: oft_R = g/2 (a power of two), and -g/2 for the Neumann path
    ("oft-scale-1", "oft", ["query"], {"block_size": 4, "scale": 1.0}, False),
    ("oft-neumann-scale-1", "oft", ["query"], {"block_size": 4, "map": "cayley_neumann",
                                               "scale": 1.0}, False),
    ("oft-full", full_blocks, None, {}, False),
    ("boft", "boft", ["value"], {"block_size": 4}, True),
    ("boft-triangles", "boft", ["value", "query"], {"block_size": 8, "full_blocks": False},
     False),
    ("hra", "hra", ["query"], {"reflections": 4}, True),
    ("hra-gram-schmidt", "hra", ["query", "value"], {"reflections": 2, "gram_schmidt": True},
     True),
]


def conditioned_bert(preset, targets, options) -> nn.Module:
    model = bert()
    if callable(preset):
        preset(model)
    else:
        wc.condition(model, preset, target_modules=targets, **options)
    randomize(model, scale=0.2)
    return model


@pytest.mark.parametrize("preset, targets, options, same_parameters",
                         [c[1:] for c in EXPORTS], ids=[c[0] for c in EXPORTS])
def test_to_peft_writes_oft_boft_and_hra_that_peft_loads_with_equal_outputs(
        preset, targets, options, same_parameters, tmp_path) -> None:
    model = conditioned_bert(preset, targets, options)
    expected = run(model)
    folder = wc.to_peft(model, tmp_path / "export")
    config = json.loads((folder / "adapter_config.json").read_text())
    name = preset if isinstance(preset, str) else "oft"
    assert config["peft_type"] == name.upper()
    loaded = peft_load(bert, folder).eval()
    torch.testing.assert_close(run(loaded), expected, atol=1e-5, rtol=1e-5)
    layers = {n for n, m in loaded.named_modules()
              if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert layers == {"base_model.model." + n for n, _ in wc.conditioned_layers(model)}

    again = bert()  # and back
    wc.from_peft(again, folder)
    torch.testing.assert_close(run(again), expected, atol=1e-6, rtol=1e-6)
    if same_parameters:  # the same tensors: nothing converted
        ours = {n.split(".adapters.default.")[-1]: p for n, p in model.named_parameters()
                if p.requires_grad}
        back = {n.split(".adapters.default.")[-1]: p for n, p in again.named_parameters()
                if p.requires_grad}
        assert ours.keys() == back.keys()
        assert all(torch.equal(ours[k], back[k]) for k in ours)


@pytest.mark.parametrize("preset, targets, options",
                         [c[1:4] for c in EXPORTS if c[4]], ids=[c[0] for c in EXPORTS if c[4]])
def test_an_exported_oft_boft_or_hra_trains_in_peft_as_it_does_here(
        preset, targets, options, tmp_path) -> None:
    """PEFT's parametrization: the export has our trainable count, gradients, merged weight,
    and the same losses under AdamW for 3 steps."""
    model = conditioned_bert(preset, targets, options)
    # in eval mode: BERT's dropout off (gradients flow all the same)
    loaded = peft_load(bert, wc.to_peft(model, tmp_path / "export"), is_trainable=True).eval()

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert count(loaded) == count(model)
    target = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
                  for m in (model, loaded)]
    for i in range(3):
        losses = []
        for m, opt in zip((model, loaded), optimizers):
            opt.zero_grad()
            loss = (run(m) - target).square().mean()
            loss.backward()
            losses.append(loss.item())
        if i == 0:  # one to one, in module order (boft_s is PEFT's (out, 1) diag)
            ours, theirs = ([p for p in m.parameters() if p.requires_grad]
                            for m in (model, loaded))
            for p, q in zip(ours, theirs, strict=True):
                torch.testing.assert_close(p.grad.reshape(q.shape), q.grad, atol=1e-6,
                                           rtol=1e-5)
        for opt in optimizers:
            opt.step()
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    layer = wc.conditioned_layers(model)[0][0]
    with torch.no_grad():
        merged = loaded.merge_and_unload().get_submodule(layer).weight
        ours = wc.merge(model).get_submodule(layer).weight
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-5)


def test_oft_layers_with_one_number_of_blocks_export_as_r(tmp_path) -> None:
    """Block sizes 4 and 8 on inputs 8 and 16: PEFT's r (blocks per layer), not a size."""
    model = Twin()
    wc.condition(model, "oft", target_modules=["fc1", "fc2"], block_size=4,
                 overrides={"fc2": {"block_size": 8}})
    randomize(model, scale=0.2)
    folder = wc.to_peft(model, tmp_path / "export")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["oft_block_size"]) == (2, 0)
    torch.testing.assert_close(peft_load(Twin, folder)(TWIN_X), model(TWIN_X))


def register(transform: str, side: str = "right", **options):
    def condition(model: nn.Module) -> None:
        wc.register_conditioning(model.fc1, side=side, transform=transform, **options)
    return condition


REFUSED = [
    ("oft-exp", lambda m: wc.condition(m, "oft", target_modules=["fc1"], block_size=4,
                                       map="exp"),
     r"to_peft: layer 'fc1': PEFT's OFT has the maps 'cayley' \(use_cayley_neumann=False\) "
     r"and 'cayley_neumann', got map='exp'"),
    ("boft-first-order", lambda m: wc.condition(m, "boft", target_modules=["fc1"],
                                                block_size=4, map="first_order"),
     r"to_peft: layer 'fc1': PEFT's BOFT has the map 'cayley' only, got map='first_order'"),
    ("block-on-the-left", register("block", side="left", block_size=4),
     r"to_peft: layer 'fc1' expected a conditioning PEFT can express \(.*\), got no update "
     r"and conditioners \[pre/left block\]"),
    ("goft", lambda m: wc.condition(m, "goft", target_modules=["fc1"]),
     r"got no update and conditioners \[pre/right givens\]"),
    ("oft-and-update", lambda m: (wc.condition(m, "oft", target_modules=["fc1"], block_size=4),
                                  wc.register_update(m.fc1, rank=2)),
     r"got an update and conditioners \[pre/right block\]"),
    ("oft-and-hra", lambda m: (wc.condition(m, "oft", target_modules=["fc1"], block_size=4),
                               wc.apply_preset(m.fc2, "hra")),
     r"to_peft: PEFT stores one method per adapter; this one mixes them \('fc1': oft, "
     r"'fc2': hra\)"),
    ("oft-block-sizes", lambda m: wc.condition(m, "oft", target_modules=["fc1", "fc2"],
                                               block_size=4, overrides={"fc2": {"block_size": 2}}),
     r"to_peft: PEFT's configuration gives every layer one oft_block_size \(or number of "
     r"blocks r\); layer 'fc1' has 4, layer 'fc2' has 2"),
    ("oft-maps", lambda m: wc.condition(m, "oft", target_modules=["fc1", "fc2"], block_size=4,
                                        overrides={"fc2": {"map": "cayley_neumann"}}),
     r"one map \(use_cayley_neumann\); layer 'fc1' has False, layer 'fc2' has True"),
    ("hra-reflections", lambda m: wc.condition(m, "hra", target_modules=["fc1", "fc2"],
                                               overrides={"fc2": {"reflections": 2}}),
     r"one number of reflections r; layer 'fc1' has 8, layer 'fc2' has 2"),
]


@pytest.mark.parametrize("condition, pattern", [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_to_peft_refuses_what_peft_cannot_express_and_writes_nothing(condition, pattern,
                                                                      tmp_path) -> None:
    model = Twin()
    condition(model)
    with pytest.raises(wc.AdapterError, match=pattern):
        wc.to_peft(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_to_peft_refuses_oft_on_a_convolution(tmp_path) -> None:
    model = ConvNet()
    wc.condition(model, "oft", target_modules=["conv"], block_size=3)
    with pytest.raises(wc.AdapterError, match=r"to_peft: layer 'conv': only Linear layers "
                                              r"export to PEFT's OFT \(its convolution form is "
                                              r"another function, and it has no Conv1D form\), "
                                              r"got a Conv2d"):
        wc.to_peft(model, tmp_path / "x")


class Nested(nn.Module):
    """``a.lin`` and ``b.a.lin``: PEFT's list ``target_modules=["a.lin"]`` selects both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Module()
        self.a.lin = nn.Linear(8, 8)
        self.b = nn.Module()
        self.b.a = nn.Module()
        self.b.a.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b.a.lin(self.a.lin(x)))


@pytest.mark.parametrize("preset", ["lora", "dora", "oft", "hra"])
def test_to_peft_adapts_the_exported_layers_and_no_other(preset: str, tmp_path) -> None:
    model = Nested()
    wc.condition(model, preset, target_modules=r"a\.lin")  # a regex: a.lin only
    randomize(model, scale=0.2)
    assert [n for n, _ in wc.conditioned_layers(model)] == ["a.lin"]
    folder = wc.to_peft(model, tmp_path / "export")
    loaded = peft_load(Nested, folder)
    wrapped = [n for n, m in loaded.named_modules()
               if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    assert wrapped == ["base_model.model.a.lin"]  # regression: b.a.lin got a fresh adapter
    torch.testing.assert_close(loaded(TWIN_X), model(TWIN_X))
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == \
        r"^(?:a\.lin)$"


def seq_cls(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def test_a_classification_adapter_imports_with_its_trained_head(tmp_path) -> None:
    """PEFT's task_type="SEQ_CLS" saves the classifier (modules_to_save): imported, the
    model has PEFT's logits, trainable parameters and training trajectory; exported with
    modules_to_save=["classifier"], PEFT loads it back with the same logits."""
    peft_model = peft.get_peft_model(seq_cls(), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    labels = torch.tensor([0, 2])

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits(model), labels)
        loss.backward()
        opt.step()
        return loss.item()

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)

    peft_opt = optimizer(peft_model)
    for _ in range(5):
        step(peft_model, peft_opt)
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert not torch.allclose(head.weight, seq_cls().classifier.weight)  # the head trained
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
        "modules_to_save"] == ["classifier", "score"]

    model = seq_cls()
    assert set(wc.from_peft(model, tmp_path / "peft")) == {
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")}
    torch.testing.assert_close(logits(model), logits(peft_model), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.classifier.weight, head.weight)

    def trainable(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert trainable(model) == trainable(peft_model)
    ours_opt, peft_opt = optimizer(model), optimizer(peft_model)
    for _ in range(3):
        assert step(model, ours_opt) == pytest.approx(step(peft_model, peft_opt), rel=1e-4)

    expected = logits(model).detach()
    folder = wc.to_peft(model, tmp_path / "export", modules_to_save=["classifier"])
    loaded = peft_load(seq_cls, folder).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    again = seq_cls()
    wc.from_peft(again, folder)
    torch.testing.assert_close(logits(again), expected, atol=1e-6, rtol=1e-6)

    ours = wc.save_adapter(model, tmp_path / "ours", modules_to_save=["classifier"])
    fresh = seq_cls()  # weightcond's own format carries the head too, bit for bit
    wc.load_adapter(fresh, ours)
    assert torch.equal(logits(fresh), logits(model))
    assert trainable(fresh) == trainable(model)


def test_a_module_to_save_the_model_lacks_is_refused(tmp_path) -> None:
    model = Twin()
    wc.condition(model, "lora", target_modules=["fc1"], rank=2)
    folder = wc.to_peft(model, tmp_path / "export", modules_to_save=["fc2"])
    other = Nested()
    other.fc1 = nn.Linear(8, 8)
    before = snapshot(other)
    with pytest.raises(wc.AdapterError, match=r"from_peft: the PEFT adapter has modules_to_save "
                                              r"tensors the model does not have: 'fc2\.bias', "
                                              r"'fc2\.weight' \(another model, or a "
                                              r"conditioned module\?\)"):
        wc.from_peft(other, folder)
    assert not wc.conditioned_layers(other)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(other).items())


@pytest.mark.parametrize("modules, error, pattern", [
    ("b", wc.OptionError, r"to_peft: argument 'modules_to_save' expected a list of module "
                          r"names, got 'b'"),
    (["c"], wc.OptionError, r"to_peft: argument 'modules_to_save' expected names of modules "
                            r"of the model, got 'c'"),
    (["head"], wc.AdapterError, r"to_peft: argument 'modules_to_save' has 'head', which holds "
                                r"or is inside the conditioned layer 'head': a module to save "
                                r"is not also conditioned"),
    (["a.lin"], wc.AdapterError, r"to_peft: argument 'modules_to_save' has 'a\.lin'; PEFT "
                                 r"selects every module whose name ends with it, which would "
                                 r"also save 'b\.a\.lin'"),
], ids=["a-str", "unknown", "conditioned", "suffix"])
def test_to_peft_refuses_modules_to_save_peft_would_read_otherwise(modules, error, pattern,
                                                                    tmp_path) -> None:
    model = Nested()
    wc.condition(model, "lora", target_modules=["head"], rank=2)
    with pytest.raises(error, match=pattern):
        wc.to_peft(model, tmp_path / "x", modules_to_save=modules)
    assert list(tmp_path.iterdir()) == []


def test_a_module_to_save_with_submodules_round_trips(tmp_path) -> None:
    model = Nested()
    wc.condition(model, "lora", target_modules=["head"], rank=2)
    randomize(model, scale=0.2)
    with torch.no_grad():
        model.b.a.lin.weight.mul_(-1)  # trained: not the base's
    folder = wc.to_peft(model, tmp_path / "export", modules_to_save=["b"])
    torch.testing.assert_close(peft_load(Nested, folder)(TWIN_X), model(TWIN_X))
    again = Nested()
    wc.from_peft(again, folder)
    assert torch.equal(again(TWIN_X), model(TWIN_X))
    assert again.b.a.lin.weight.requires_grad and not again.a.lin.weight.requires_grad


@pytest.mark.parametrize("version", ["0.17.1", None, "0.18.0", "0.21.2@abc123"])
@pytest.mark.parametrize("neumann", [True, False])
def test_an_oft_adapter_from_before_peft_0_18_on_the_neumann_path_is_refused(
        version, neumann: bool, tmp_path) -> None:
    """PEFT 0.18 changed its Cayley–Neumann series; an adapter saved by an older PEFT on that
    path (peft_version below 0.18, or absent) would compute another function (found in
    review). The exact path did not change."""
    peft_model = peft.get_peft_model(bert(), peft.OFTConfig(
        r=0, oft_block_size=4, target_modules=["query"], use_cayley_neumann=neumann))
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if version is None:
        config.pop("peft_version", None)
    else:
        config["peft_version"] = version
    config_file.write_text(json.dumps(config))
    old = version is None or version.startswith("0.17")
    if neumann and old:
        with pytest.raises(wc.AdapterError, match=r"PEFT 0\.18 changed that series"):
            wc.from_peft(bert(), tmp_path)
    else:
        assert wc.from_peft(bert(), tmp_path)
