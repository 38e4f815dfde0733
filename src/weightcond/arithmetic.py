"""Arithmetic word problems in the style of GSM8K, generated from templates and a seed.

The ``arithmetic`` task of ``weightcond compare`` (:mod:`weightcond.compare`) fine-tunes a
causal language model on these problems: no GSM8K ships in any package weightcond may
depend on, so weightcond writes its own. Each :data:`TEMPLATES` entry is a short story
with one to three operations (addition, subtraction, multiplication, exact division);
its numbers are drawn in one of three sizes (:data:`SIZES`: units, tens, hundreds) so
that a model meets small and large operands. The solution is written as GSM8K's worked
solutions are: one equation per step, then ``The answer is N.``: the answer is the final
number of the solution (:func:`final_number`), and a generated solution is right when its
final number equals the answer (exact match).

Train and held-out problems are disjoint by **template instance** (a template with its
numbers; the names and items a story draws do not count), so a held-out problem is never a
training problem with another name (:func:`generate`).

Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import OptionError

__all__ = ["SIZES", "TEMPLATES", "Problem", "Template", "final_number", "generate"]

#: The ranges a template's numbers are drawn from, by size (one size per problem; a
#: multiplier or a divisor is a single digit, ``2..9``, in every size).
SIZES = {"units": (2, 9), "tens": (10, 99), "hundreds": (100, 999)}

_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi",
          "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")
_ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cards", "shells", "stamps",
          "cookies", "coins")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One word problem.

    Attributes:
        question: the story and its question.
        solution: the worked solution, one equation per step, ending ``The answer is N.``.
        answer: the final number ``N``.
        template: the index of its :data:`TEMPLATES` entry.
        numbers: the numbers the template was filled with (with ``template``, the problem's
            instance: what :func:`generate` keeps apart between train and held-out).
    """

    question: str
    solution: str
    answer: int
    template: int
    numbers: tuple[int, ...]

    @property
    def instance(self) -> tuple[int, tuple[int, ...]]:
        """Return the template's index and the numbers it was filled with (what makes two
        problems the same instance)."""
        return self.template, self.numbers


@dataclass(frozen=True)
class Template:
    """A story with its operations.

    Attributes:
        name: a short name (``"buy_then_give"``).
        steps: the number of operations of its solution.
        draw: draws the numbers from a random generator and a size range ``(low, high)``;
            returns ``None`` when they do not make a valid story (a negative count),
            so the caller draws again.
        write: ``(numbers, words) -> (question, [(left, op, right, result), ...])`` with
            ``words`` holding ``name``, ``friend`` and ``item``.
    """

    name: str
    steps: int
    draw: Callable[..., tuple[int, ...] | None]
    write: Callable[..., tuple[str, list[tuple[int, str, int, int]]]]


def _free(rng: random.Random, size: tuple[int, int], n: int) -> tuple[int, ...]:
    return tuple(rng.randint(*size) for _ in range(n))


def _factor(rng: random.Random, size: tuple[int, int]) -> int:
    # a multiplier or divisor has one digit, so that a step is worked in one line
    return rng.randint(2, 9)


def _positive(*numbers: int) -> tuple[int, ...] | None:
    return numbers if all(n > 0 for n in numbers) else None


def _draw_ab(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...]:
    return _free(rng, size, 2)


def _draw_sub(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...] | None:
    a, b = _free(rng, size, 2)
    return _positive(max(a, b), min(a, b)) if a != b else None


def _draw_mul(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...]:
    return rng.randint(*size), _factor(rng, size)


def _draw_div(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...]:
    each, groups = rng.randint(*size), _factor(rng, size)
    return each * groups, groups


def _draw_add_sub(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...] | None:
    a, b, c = _free(rng, size, 3)
    return (a, b, c) if c < a + b else None


def _draw_mul_add(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...]:
    return _factor(rng, size), rng.randint(*size), rng.randint(*size)


def _draw_change(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...] | None:
    price, count = rng.randint(*size), _factor(rng, size)
    paid = price * count + rng.randint(1, size[1])
    return price, count, paid


def _draw_three(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...] | None:
    pay, days = rng.randint(*size), _factor(rng, size)
    spent, extra = rng.randint(1, pay * days - 1), rng.randint(*size)
    return pay, days, spent, extra


def _draw_div_sub(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...] | None:
    each, bags = rng.randint(*size), _factor(rng, size)
    eaten = rng.randint(1, each - 1) if each > 1 else 0
    return _positive(each * bags, bags, eaten)


def _draw_twice(rng: random.Random, size: tuple[int, int]) -> tuple[int, ...]:
    return rng.randint(*size), rng.randint(2, 4)


_TIMES = {2: "twice", 3: "three times", 4: "four times"}

#: The stories, each with its number of steps; :func:`generate` draws a template uniformly.
TEMPLATES: tuple[Template, ...] = (
    Template("buy_more", 1, _draw_ab, lambda n, w: (
        f"{w['name']} has {n[0]} {w['item']}. {w['name']} buys {n[1]} more. How many "
        f"{w['item']} does {w['name']} have now?", [(n[0], "+", n[1], n[0] + n[1])])),
    Template("give_away", 1, _draw_sub, lambda n, w: (
        f"{w['name']} had {n[0]} {w['item']} and gave {n[1]} of them to {w['friend']}. How "
        f"many {w['item']} does {w['name']} have left?", [(n[0], "-", n[1], n[0] - n[1])])),
    Template("boxes", 1, _draw_mul, lambda n, w: (
        f"A box holds {n[0]} {w['item']}. {w['name']} fills {n[1]} boxes. How many "
        f"{w['item']} are in the boxes?", [(n[0], "*", n[1], n[0] * n[1])])),
    Template("share", 1, _draw_div, lambda n, w: (
        f"{w['name']} shares {n[0]} {w['item']} equally among {n[1]} friends. How many "
        f"{w['item']} does each friend get?", [(n[0], "/", n[1], n[0] // n[1])])),
    Template("buy_then_give", 2, _draw_add_sub, lambda n, w: (
        f"{w['name']} has {n[0]} {w['item']}, buys {n[1]} more and then gives {n[2]} to "
        f"{w['friend']}. How many {w['item']} does {w['name']} have now?",
        [(n[0], "+", n[1], n[0] + n[1]), (n[0] + n[1], "-", n[2], n[0] + n[1] - n[2])])),
    Template("packs_and_found", 2, _draw_mul_add, lambda n, w: (
        f"{w['name']} buys {n[0]} packs of {w['item']} with {n[1]} in each pack and finds "
        f"{n[2]} more. How many {w['item']} does {w['name']} have?",
        [(n[0], "*", n[1], n[0] * n[1]), (n[0] * n[1], "+", n[2], n[0] * n[1] + n[2])])),
    Template("change", 2, _draw_change, lambda n, w: (
        f"A notebook costs {n[0]} dollars. {w['name']} buys {n[1]} notebooks and pays with "
        f"{n[2]} dollars. How many dollars of change does {w['name']} get?",
        [(n[0], "*", n[1], n[0] * n[1]), (n[2], "-", n[0] * n[1], n[2] - n[0] * n[1])])),
    Template("earn_spend_earn", 3, _draw_three, lambda n, w: (
        f"{w['name']} earns {n[0]} dollars a day for {n[1]} days, spends {n[2]} dollars and "
        f"then earns {n[3]} dollars more. How many dollars does {w['name']} have?",
        [(n[0], "*", n[1], n[0] * n[1]), (n[0] * n[1], "-", n[2], n[0] * n[1] - n[2]),
         (n[0] * n[1] - n[2], "+", n[3], n[0] * n[1] - n[2] + n[3])])),
    Template("bags_eaten", 2, _draw_div_sub, lambda n, w: (
        f"{w['name']} puts {n[0]} {w['item']} into {n[1]} bags with the same number in each "
        f"bag and takes {n[2]} out of one bag. How many {w['item']} are left in that bag?",
        [(n[0], "/", n[1], n[0] // n[1]), (n[0] // n[1], "-", n[2], n[0] // n[1] - n[2])])),
    Template("times_as_many", 2, _draw_twice, lambda n, w: (
        f"{w['name']} reads {n[0]} pages on Monday and {_TIMES[n[1]]} as many pages on "
        f"Tuesday. How many pages does {w['name']} read on the two days?",
        [(n[0], "*", n[1], n[0] * n[1]), (n[0], "+", n[0] * n[1], n[0] + n[0] * n[1])])),
)


def _problem(index: int, numbers: tuple[int, ...], words: dict[str, str]) -> Problem:
    question, steps = TEMPLATES[index].write(numbers, words)
    lines = [f"{a} {op} {b} = {c}." for a, op, b, c in steps]
    answer = steps[-1][3]
    return Problem(question, " ".join([*lines, f"The answer is {answer}."]), answer, index,
                   numbers)


def _draw(rng: random.Random) -> tuple[int, tuple[int, ...], dict[str, str]]:
    while True:
        index = rng.randrange(len(TEMPLATES))
        size = SIZES[rng.choice(tuple(SIZES))]
        numbers = TEMPLATES[index].draw(rng, size)
        name, friend = rng.sample(_NAMES, 2)
        words = {"name": name, "friend": friend, "item": rng.choice(_ITEMS)}
        if numbers is not None:
            return index, numbers, words


def generate(train: int, held_out: int, *, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Generate ``train`` training and ``held_out`` held-out problems, disjoint by template
    instance.

    Problems are drawn from ``random.Random(seed)``: a template uniformly, a size of
    :data:`SIZES` uniformly, then the template's numbers, names and item. A draw whose
    instance (template and numbers) was drawn before is skipped, so no two problems share
    an instance. The held-out problems are drawn first: they depend only on ``held_out``
    and ``seed``, not on ``train``, and every training problem's instance differs from
    every held-out one's.

    Args:
        train: the number of training problems (``>= 0``).
        held_out: the number of held-out problems (``>= 0``).
        seed: the seed of the draws.

    Returns:
        ``(train_problems, held_out_problems)``, each in draw order.

    Raises:
        OptionError: a count that is not an int ``>= 0`` or above 200,000, or a ``seed``
            that is not an int.

    Example:
        >>> from weightcond.arithmetic import generate
        >>> train, held = generate(3, 2, seed=0)
        >>> len(train), len(held), train[0].answer == int(train[0].solution.split()[-1][:-1])
        (3, 2, True)
    """
    where = "arithmetic.generate"
    for name, value in (("train", train), ("held_out", held_out)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 200_000:
            raise OptionError(f"{where}: argument {name!r} expected an int in [0, 200000], "
                              f"got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"{where}: argument 'seed' expected an int, got {seed!r}")
    rng = random.Random(seed)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: list[list[Problem]] = [[], []]
    for part, count in ((1, held_out), (0, train)):
        while len(out[part]) < count:
            index, numbers, words = _draw(rng)
            if (index, numbers) in seen:
                continue
            seen.add((index, numbers))
            out[part].append(_problem(index, numbers, words))
    return out[0], out[1]


def final_number(text: str) -> int | float | None:
    """The last number written in ``text`` (``None`` if there is none): how a generated
    solution's answer is read, as GSM8K's evaluations read the final number.

    ``"3 + 4 = 7. The answer is 7."`` → ``7``; a comma between digit groups is read
    (``"1,250"`` → ``1250``); a decimal is returned as a float.
    """
    found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    if not found:
        return None
    value: Any = float(found[-1]) if "." in found[-1] else int(found[-1])
    return value
