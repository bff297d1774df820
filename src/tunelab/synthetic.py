"""Deterministic synthetic data for the tiny study: short, learnable Alpaca-format tasks and generic text.

`alpaca_records(n, seed)` gives instruction/input/output records of four task families whose answers
depend on the input (copy, reverse, shift, add), each tagged with its `category`; `generic_text(n, seed)`
gives plain documents for warming up a random-weight model before the study's runs (no Alpaca prompt in them).

The operands are strings of distinct digits. A byte-level BPE keeps every digit a token of its own, with or
without a space before it, so an answer reuses the input's tokens; with distinct digits the copying is never
ambiguous. (Words are different: "apple" at a line start and " apple" inside a line are two tokens, a mapping a
2-layer model does not learn in a few minutes.)
"""

from __future__ import annotations

import random


def _digits(rng: random.Random) -> str:
    """3 to 6 distinct digits."""
    return "".join(map(str, rng.sample(range(10), rng.randint(3, 6))))


def _shifted(digits: str) -> str:
    """Every digit plus one, 9 becoming 0."""
    return "".join(str((int(d) + 1) % 10) for d in digits)


def _sum_operands(rng: random.Random) -> tuple[int, int]:
    """A two-digit number and a digit whose sum has no carry."""
    units = rng.randint(0, 9)
    return rng.randint(1, 9) * 10 + units, rng.randint(0, 9 - units)


def _copy(rng: random.Random) -> tuple[str, str, str]:
    digits = _digits(rng)
    return f"Repeat the number {digits}.", "", digits  # no input: the template without input is exercised too


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    digits = _digits(rng)
    return "Reverse the digits.", digits, digits[::-1]


def _shift(rng: random.Random) -> tuple[str, str, str]:
    digits = _digits(rng)
    return "Add one to every digit (9 becomes 0).", digits, _shifted(digits)


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = _sum_operands(rng)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


FAMILIES = {"copy": _copy, "reverse": _reverse, "shift": _shift, "add": _add}


def alpaca_records(count: int, seed: int = 0) -> list[dict]:
    """`count` Alpaca-format records, the families in turn, each tagged with its `category`.

    A family draws again (up to 100 times) rather than repeat a record: the data stage drops exact duplicates,
    and a test record must not be a training record.
    """
    rng = random.Random(seed)
    names = list(FAMILIES)
    records, seen = [], set()
    for index in range(count):
        category = names[index % len(names)]
        for _ in range(100):
            record = FAMILIES[category](rng)
            if record not in seen:
                break
        seen.add(record)
        instruction, input_text, output = record
        records.append({"instruction": instruction, "input": input_text, "output": output, "category": category})
    return records


def generic_text(count: int, seed: int = 0) -> list[str]:
    """`count` plain documents that hold the tasks' skills, for language-model warm-up.

    Like a real pre-training corpus, the text holds the skills the tasks need (a number said again, backwards,
    shifted by one, small sums) in prose and in note-like sections (`### Input:` then `### Backwards:`, or
    `### Task: backwards` then `### Output:`), but never the Alpaca prompt or one of the study's instructions.
    The warmed-up base has the skills but does not know what the study's instructions ask: it scores about 0
    until it is fine-tuned, and a few hundred fine-tuning steps then map each instruction onto its skill.
    """
    rng = random.Random(seed + 1)

    def section(cue: str, operand: str, result: str, prose: str) -> str:
        return rng.choice([prose, f"### Input:\n{operand}\n\n### {cue.capitalize()}:\n{result}",
                           f"### Task: {cue}\n\n### Input:\n{operand}\n\n### Output:\n{result}"])

    def again() -> str:
        digits = _digits(rng)
        return rng.choice([section("again", digits, digits, f"{digits}, again {digits}."),
                           f"### Task: again {digits}\n\n### Output:\n{digits}"])  # inline, as the copy task has it

    def backwards() -> str:
        digits = _digits(rng)
        return section("backwards", digits, digits[::-1], f"{digits} backwards is {digits[::-1]}.")

    def plus_one() -> str:
        digits = _digits(rng)
        return section("plus one", digits, _shifted(digits), f"{digits} plus one is {_shifted(digits)}.")

    def total() -> str:
        a, b = _sum_operands(rng)
        return section("sum", f"{a} + {b}", str(a + b), f"{a} plus {b} is {a + b}.")

    skills = (again, backwards, plus_one, total)
    return ["\n\n".join(rng.choice(skills)() for _ in range(rng.randint(2, 5))) for _ in range(count)]
