"""Hugging Face saving of a conditioned model loses nothing.

``save_pretrained`` (and ``Trainer.save_model``) write the merged weights, which
``from_pretrained`` reloads into the same function with no missing keys, or raise a typed
error before writing; the Trainer's checkpoints, with :class:`wc.AdapterCheckpointCallback`,
hold the adapter alone and resume bit for bit. Everything runs against the installed
transformers: a real ``Trainer``, real ``save_pretrained`` and ``from_pretrained``, on models
built from small configs.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import weightcond as wc
from weightcond.model import checkpoint_keys

from helpers import PRESET_NAMES, randomize

pytest.importorskip("accelerate")  # the Trainer needs it
transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def config(**changes: object) -> transformers.BertConfig:
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=100, num_labels=2,
                                   **changes)


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertModel(config()).eval()


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config())


def gpt2(seed: int = 0, **changes: object) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0, **changes)).eval()


@torch.no_grad()
def output(model: nn.Module) -> torch.Tensor:
    out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def data_bytes(file: Path) -> int:
    """The bytes of a safetensors file's tensors: its size less the 8-byte header length and
    the JSON header."""
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - header


def file_keys(folder: Path, name: str = "model.safetensors") -> set[str]:
    with safe_open(str(folder / name), "pt") as f:
        return set(f.keys())


def assert_reloads_the_merged_model(model: nn.Module, folder: Path,
                                    adapter_name: str | None = None) -> None:
    """``from_pretrained(folder)`` loads every key of a plain model of ``model``'s class and no
    other, and its tensors are those of ``wc.merge`` on a copy of ``model``, bit for bit."""
    merged = wc.merge(copy.deepcopy(model), adapter_name=adapter_name)
    reloaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert file_keys(folder) == set(reloaded.state_dict()) - set(reloaded.all_tied_weights_keys)
    expected = merged.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(output(reloaded.eval()), output(merged.eval()))


# -- save_pretrained -----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_save_pretrained_writes_what_from_pretrained_reloads(tmp_path, preset) -> None:
    model = bert()
    wc.condition(model, preset, target_modules=["query", "value"])
    randomize(model, scale=0.1)
    before = output(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    assert_reloads_the_merged_model(model, tmp_path)
    # the outputs of the conditioned model, to the rounding of its dense weight
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(reloaded), before)
    # and the model is as it was: conditioned, every tensor unchanged
    assert len(wc.conditioned_layers(model)) == 4
    assert torch.equal(output(model), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_save_pretrained_merges_conv1d_layers_and_a_conditioned_bias(tmp_path) -> None:
    model = gpt2(tie_word_embeddings=False)
    wc.condition(model, "sora", target_modules=["c_attn", "c_proj"], map="first_order",
                 condition_bias=True)
    randomize(model, scale=0.1)
    model.save_pretrained(tmp_path)
    assert_reloads_the_merged_model(model, tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(reloaded), output(model))


def test_save_pretrained_writes_the_active_adapter(tmp_path) -> None:
    model = bert()
    wc.condition(model, "lora", target_modules=["query", "value"], adapter_name="a")
    wc.condition(model, "dora", target_modules=["query"], adapter_name="b")
    randomize(model, seed=1)  # b, the active one
    wc.set_adapter(model, "a")
    randomize(model, seed=2)
    model.save_pretrained(tmp_path)
    assert_reloads_the_merged_model(model, tmp_path, adapter_name="a")


def test_save_pretrained_merges_a_state_dict_it_is_given(tmp_path) -> None:
    model = bert()
    wc.condition(model, "pre_diag", target_modules=["query"])
    randomize(model)
    given = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the given tensors are the ones written, not the module's
        model.encoder.layer[0].attention.self.query.parametrizations.weight.original.mul_(2)
    model.save_pretrained(tmp_path / "given", state_dict=given)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.parametrizations.weight.original.div_(2)
    model.save_pretrained(tmp_path / "own")
    for key in file_keys(tmp_path / "own"):
        with safe_open(str(tmp_path / "own" / "model.safetensors"), "pt") as own, \
                safe_open(str(tmp_path / "given" / "model.safetensors"), "pt") as got:
            assert torch.equal(own.get_tensor(key), got.get_tensor(key)), key

    partial = {k: v for k, v in given.items() if "update.A" not in k}
    with pytest.raises(wc.StateError, match=r"save_pretrained: argument 'state_dict' expected "
                       r"every tensor of the conditioned layer 'encoder\.layer\.0\.attention"
                       r"\.self\.query', got none for '.*update\.A'"):
        model.save_pretrained(tmp_path / "partial", state_dict=partial)
    assert not (tmp_path / "partial").exists()


def test_a_tied_conditioned_weight_is_refused_before_anything_is_written(tmp_path) -> None:
    model = gpt2()  # lm_head.weight is tied to transformer.wte.weight
    wc.condition(model, "lora", target_modules=["lm_head", "c_attn"])
    with pytest.raises(wc.StateError, match=r"save_pretrained: argument 'model' expected "
                       r"conditioned layers whose weight transformers does not tie, got "
                       r"'lm_head', whose weight is tied to 'transformer\.wte\.weight'"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_copies_are_guarded_and_merged_models_save_as_transformers_does(tmp_path) -> None:
    model = bert()
    wc.condition(model, "sora", target_modules=["query"])
    twin = copy.deepcopy(model)
    randomize(twin, seed=5)  # the copy's save writes the copy, not the original
    twin.save_pretrained(tmp_path / "twin")
    assert_reloads_the_merged_model(twin, tmp_path / "twin")

    merged = pickle.loads(pickle.dumps(wc.merge(twin)))  # a merged model pickles
    merged.save_pretrained(tmp_path / "merged")
    assert file_keys(tmp_path / "merged") == file_keys(tmp_path / "twin")
    torch.testing.assert_close(
        output(transformers.BertModel.from_pretrained(tmp_path / "merged").eval()),
        output(merged), atol=0, rtol=0)

    # the guard makes no reference cycle: the model goes with its last reference (and its
    # accelerator memory with it), not at the next cyclic garbage collection
    gc.disable()
    try:
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()


# -- the Trainer ---------------------------------------------------------------------------------
def dataset(n: int = 48) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 8), generator=gen)
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    return [{"input_ids": i, "labels": label} for i, label in zip(ids, labels)]


def conditioned_classifier() -> nn.Module:
    model = classifier()  # dropout on: resuming must restore the RNG states too
    wc.condition(model, "sora", target_modules=["query", "value", "dense"], rank=4)
    model.classifier.requires_grad_(True)
    return model


def trainer(model: nn.Module, folder: Path, **changes: object) -> transformers.Trainer:
    options: dict[str, object] = dict(
        output_dir=str(folder), per_device_train_batch_size=8, max_steps=6,
        learning_rate=2e-2, warmup_steps=2, logging_steps=1, save_strategy="steps",
        save_steps=3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    options.update(changes)
    args = transformers.TrainingArguments(**options)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                eval_dataset=dataset(16),
                                callbacks=[wc.AdapterCheckpointCallback()])


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k in set(checkpoint_keys(model))}


def losses(trainer: transformers.Trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_trainer_checkpoints_hold_only_the_adapter(tmp_path) -> None:
    model = conditioned_classifier()
    keys = checkpoint_keys(model)
    assert any("classifier" in k for k in keys) and any("update.A" in k for k in keys)
    run = trainer(model, tmp_path / "run")
    run.train()
    adapter_bytes = sum(v.numel() * v.element_size() for v in trained(model).values())
    for step in (3, 6):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert file_keys(checkpoint) == set(keys)
        assert data_bytes(checkpoint / "model.safetensors") == adapter_bytes
        assert [p.name for p in checkpoint.glob("model*")] == ["model.safetensors"]
    # after training, save_model writes the merged model again: every weight of the model
    run.save_model(str(tmp_path / "final"))
    assert_reloads_the_merged_model(model, tmp_path / "final")
    model_bytes = sum(v.numel() * v.element_size() for v in wc.merge(model).state_dict().values())
    assert data_bytes(tmp_path / "final" / "model.safetensors") == model_bytes > 4 * adapter_bytes


def test_resuming_from_an_adapter_checkpoint_is_bit_exact(tmp_path) -> None:
    whole = conditioned_classifier()
    uninterrupted = trainer(whole, tmp_path / "whole")
    uninterrupted.train()

    resumed_model = conditioned_classifier()  # the adapter at its initial values again
    assert not all(torch.equal(v, trained(whole)[k])
                   for k, v in trained(resumed_model).items())
    resumed = trainer(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))

    expected = trained(whole)
    for key, value in trained(resumed_model).items():
        assert torch.equal(value, expected[key]), key
    # steps 1-3 come with the checkpoint's trainer state, 4-6 are computed again
    assert losses(resumed) == losses(uninterrupted) and len(losses(resumed)) == 6
    assert torch.equal(output(resumed_model.eval()), output(whole.eval()))


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path) -> None:
    model = conditioned_classifier()
    # "best" is the highest evaluation loss: the first checkpoint, not the last
    run = trainer(model, tmp_path / "run", eval_strategy="steps", eval_steps=3,
                  load_best_model_at_end=True, metric_for_best_model="loss",
                  greater_is_better=True, learning_rate=0.3)
    run.train()
    best = Path(run.state.best_model_checkpoint)
    assert best.name == "checkpoint-3"
    restored = trained(model)
    with safe_open(str(best / "model.safetensors"), "pt") as f:
        assert all(torch.equal(value, f.get_tensor(key)) for key, value in restored.items())
    with safe_open(str(tmp_path / "run" / "checkpoint-6" / "model.safetensors"), "pt") as f:
        assert not all(torch.equal(value, f.get_tensor(key)) for key, value in restored.items())


def test_the_callback_refuses_a_model_it_cannot_checkpoint(tmp_path) -> None:
    run = trainer(classifier(), tmp_path / "plain")
    with pytest.raises(wc.StateError, match=r"adapter_checkpoints: argument 'model' expected "
                       r"a model with conditioned layers, got an unconditioned "
                       r"BertForSequenceClassification"):
        run.train()
    assert not any((tmp_path / "plain").glob("checkpoint-*"))


@pytest.mark.parametrize("how", ["load_adapter", "from_peft"])
def test_a_model_given_its_adapter_by_a_loader_saves_merged(tmp_path, how: str) -> None:
    """load_adapter and from_peft go through the same activation as condition(): their
    model's save_pretrained writes what from_pretrained reloads too."""
    source = bert()
    wc.condition(source, "lora", target_modules=["query", "value"], rank=2)
    randomize(source, scale=0.1)
    model = bert()
    if how == "load_adapter":
        wc.load_adapter(model, wc.save_adapter(source, tmp_path / "adapter"))
    else:
        wc.from_peft(model, wc.to_peft(source, tmp_path / "adapter"))
    torch.testing.assert_close(output(model), output(source))
    model.save_pretrained(tmp_path / "saved")
    assert_reloads_the_merged_model(model, tmp_path / "saved")
