"""The arithmetic task: the problem generator, and ``weightcond compare --task arithmetic``'s
loss, accuracy and training path on a tiny random decoder with a character tokenizer (the
real model is loaded by tests/test_decoder.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import string
from pathlib import Path

import pytest
import torch

import weightcond as wc
import weightcond.compare as compare
import weightcond.data
from weightcond.arithmetic import SIZES, TEMPLATES, final_number, generate
from weightcond.cli import main
from weightcond.compare import ArithmeticTask, Schedule, Settings, load_task, train_run

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


# --- the generator ---------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_problems_and_another_seed_others() -> None:
    assert generate(300, 50, seed=3) == generate(300, 50, seed=3)
    other = generate(300, 50, seed=4)
    assert [p.question for p in other[0]] != [p.question for p in generate(300, 50, seed=3)[0]]


def test_held_out_does_not_depend_on_the_training_count() -> None:
    assert generate(10, 40, seed=0)[1] == generate(2000, 40, seed=0)[1]


def test_train_and_held_out_are_disjoint_by_template_instance() -> None:
    train, held = generate(5000, 500, seed=0)
    instances = [p.instance for p in train + held]
    assert len(set(instances)) == len(instances)  # no instance twice, in or across parts
    assert not {p.instance for p in train} & {p.instance for p in held}
    assert not {p.question for p in train} & {p.question for p in held}


def test_every_solution_is_worked_right_and_ends_with_the_answer() -> None:
    """Each equation of a solution is true, each step uses the previous result, and the
    answer is the final number, also of the question's template arithmetic."""
    train, _ = generate(3000, 0, seed=1)
    for p in train:
        steps = _EQUATION.findall(p.solution)
        assert len(steps) == TEMPLATES[p.template].steps
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c
            assert op != "/" or a % b == 0  # exact division
            assert c >= 0
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert final_number(p.solution) == p.answer == int(steps[-1][3])
        assert all(str(n) in p.question for n in p.numbers if n > 12)  # the story's numbers


def test_problems_cover_operations_steps_and_sizes() -> None:
    train, _ = generate(4000, 0, seed=0)
    assert {p.template for p in train} == set(range(len(TEMPLATES)))
    assert {TEMPLATES[p.template].steps for p in train} == {1, 2, 3}
    ops = {op for p in train for _, op, _, _ in _EQUATION.findall(p.solution)}
    assert ops == {"+", "-", "*", "/"}
    digits = {len(str(n)) for p in train for n in p.numbers}
    assert {1, 2, 3} <= digits
    assert {name for name in SIZES} == {"units", "tens", "hundreds"}


@pytest.mark.parametrize(("text", "expected"), [
    ("3 + 4 = 7. The answer is 7.", 7), ("The answer is 1,250.", 1250),
    ("12 apples and 2.5 kg", 2.5), ("no number", None), ("5 - 8 = -3", -3), ("7\n\n8", 8)])
def test_final_number(text: str, expected: float | None) -> None:
    assert final_number(text) == expected


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"train": -1, "held_out": 1}, "'train'"), ({"train": 1, "held_out": 1.5}, "'held_out'"),
    ({"train": 1, "held_out": 1, "seed": "0"}, "'seed'")])
def test_generate_checks_its_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(wc.OptionError, match=match):
        generate(**kwargs)


# --- the task on a tiny decoder ----------------------------------------------------------------

def char_tokenizer():
    """A tokenizer of one token per character (pad 0, end 1), with no downloads."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


def tiny_lm(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_task(monkeypatch: pytest.MonkeyPatch):
    """``load_task`` of the arithmetic task with the tiny decoder in place of SmolLM2."""
    tokenizer = char_tokenizer()
    model = tiny_lm(len(tokenizer))
    loaded = []

    def load(name: str = "smollm2-135m"):
        loaded.append(name)
        return tokenizer, copy.deepcopy(model)

    monkeypatch.setattr(weightcond.data, "load_causal_lm", load)
    return loaded


def quick(**changes) -> Schedule:
    return dataclasses.replace(Schedule.of("arithmetic", quick=True), train_size=64,
                               eval_size=6, max_length=320, dtype="float32", **changes)


def test_the_loss_is_the_solution_tokens_cross_entropy(tiny_task) -> None:
    """Left padding, position ids and the logits kept for the solution give the loss of each
    problem computed alone with the full logits, averaged over all solution tokens."""
    task = load_task(quick())
    assert isinstance(task, ArithmeticTask)
    problems = task.train[:4]
    batch = task._collate(problems)
    assert (batch["attention_mask"][:, 0] == 0).any()  # rows of different lengths
    loss = task.loss(task.model, batch)
    total, count = 0.0, 0
    for p in problems:
        prompt, solution = task._encode(p)
        ids = torch.tensor([prompt + solution])
        logits = task.model(ids).logits[0, len(prompt) - 1:-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):],
                                                   reduction="sum").item()
        count += len(solution)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert batch["target"].sum().item() == count


def test_the_prompt_is_context_only(tiny_task) -> None:
    """Changing a prompt token changes the loss only through the context: the loss counts
    the solution tokens, never the prompt's (a target on the prompt would move by more)."""
    task = load_task(quick())
    batch = task._collate(task.train[:2])
    prompt_len = len(task._encode(task.train[0])[0])
    assert batch["target"][0].sum() == len(task._encode(task.train[0])[1])
    assert not batch["target"][0, :-len(task._encode(task.train[0])[1])].any()
    assert batch["attention_mask"][0].sum() == prompt_len + batch["target"][0].sum()
    first_solution = batch["target"][0].nonzero()[0].item()
    assert batch["input_ids"][0, first_solution - 1] == task.tokenizer(":").input_ids[0]


def test_accuracy_is_exact_match_of_the_final_number(tiny_task, monkeypatch) -> None:
    """A model whose greedy completion is the right solution scores 1, one that is off by
    one in the last number 0, and the random tiny model about 0."""
    task = load_task(quick())
    tok = task.tokenizer

    def completing(shift: int):
        def generate(input_ids, attention_mask, generation_config):
            rows = []
            for ids in input_ids:
                text = tok.decode(ids, skip_special_tokens=True)
                problem = next(p for p in task.held if text.endswith(p.question + "\nAnswer:"))
                text = f" {problem.solution[:-1]}{shift or ''}."
                rows.append([*tok(text, add_special_tokens=False).input_ids, tok.eos_token_id])
            width = max(map(len, rows))
            new = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
            return torch.cat([input_ids, new], 1)
        return generate

    model = copy.deepcopy(task.model)
    monkeypatch.setattr(model, "generate", completing(0))
    assert task.accuracy(model) == 1.0
    monkeypatch.setattr(model, "generate", completing(1))  # "... is 7." -> "... is 71."
    assert task.accuracy(model) == 0.0
    assert task.accuracy_before() < 0.5


def test_train_run_learns_and_records(tiny_task) -> None:
    """train_run on the arithmetic task trains the adapter (the loss falls over the steps),
    records accuracy before and after, the dtype and one entropy per projection."""
    schedule = dataclasses.replace(quick(), steps=12, batch_size=8, lr=3e-3)
    task = load_task(schedule)
    record, _ = train_run(task, schedule, "sora", {}, 0)
    assert tiny_task == ["smollm2-135m"]
    assert record["dtype"] == "float32" and 0 <= record["accuracy"] <= 1
    assert record["accuracy_before"] == task.accuracy_before()
    assert len(record["layers"]) == 2 * 7
    assert len(record["losses"]) == 12
    assert sum(record["losses"][-3:]) < sum(record["losses"][:3])
    again, _ = train_run(task, schedule, "sora", {}, 0)
    assert again["losses"] == record["losses"]
    with pytest.raises(wc.OptionError, match="task"):
        train_run(task, dataclasses.replace(schedule, task="sentiment", model=None), "lora",
                  {}, 0)


def test_compare_quick_writes_the_same_results_and_adapters(tiny_task, tmp_path: Path,
                                                             capsys) -> None:
    out = tmp_path / "arith"
    assert main(["compare", "--task", "arithmetic", "--quick", "--eval-size", "6",
                 "--max-length", "320", "--presets", "lora,oft", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["task"] == "arithmetic"
    assert results["data"]["task"] == "arithmetic" and results["data"]["held_out"] == 6
    assert [s["preset"] for s in results["summary"]] == ["lora", "oft"]
    assert "before" in printed.splitlines()[-7] or "before" in printed
    for name in ("lora", "oft"):
        assert (out / "adapters" / name / "weightcond_adapter.json").is_file()
    assert (out / "entropy_per_layer.png").is_file()


def test_a_sweep_runs_on_the_arithmetic_task(tiny_task, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    space = tmp_path / "space.toml"
    space.write_text('[[variants]]\npreset = "lora"\n[[variants]]\npreset = "pre_diag"\n')
    assert main(["sweep", "--space", str(space), "--task", "arithmetic", "--quick",
                 "--eval-size", "6", "--max-length", "320", "--seeds", "0,1",
                 "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["sweep"]["schedule"]["task"] == "arithmetic"
    assert {t["data"]["task"] for t in results["trials"]} == {"arithmetic"}
    assert len(results["trials"]) == 4


@pytest.mark.parametrize(("argv", "match"), [
    (["--presets", "head"], "causal LM has no head"),
    (["--model", "gpt2"], "'model' expected one of 'smollm2-135m', 'gemma3-270m'"),
    (["--eval-size", "501"], "eval_size"),
    (["--dtype", "float16"], "'dtype'")])
def test_arithmetic_arguments_are_checked_before_loading(argv: list[str], match: str,
                                                         tiny_task, tmp_path: Path,
                                                         capsys) -> None:
    assert main(["compare", "--task", "arithmetic", *argv,
                 "--output", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err
    assert tiny_task == [] and not (tmp_path / "o").exists()


def test_sentiment_takes_no_model() -> None:
    with pytest.raises(wc.OptionError, match="'model' expected None"):
        Settings(model="smollm2-135m").check()


def test_the_lm_target_shapes_are_the_models() -> None:
    """The stand-in shapes Settings.check uses for each causal LM are those of the
    projections its configuration gives (a tiny config of the same shape)."""
    shapes = {"smollm2-135m": dict(hidden_size=576, intermediate_size=1536,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64),
              "gemma3-270m": dict(hidden_size=640, intermediate_size=2048,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256)}
    for name, dims in shapes.items():
        config = transformers.LlamaConfig(vocab_size=8, num_hidden_layers=1, **dims)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        found = {(m.out_features, m.in_features) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        assert found == set(compare.LM_TARGET_SHAPES[name])
