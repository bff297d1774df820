"""Deterministic synthetic data for the tiny study: short, learnable Alpaca-format tasks and generic text.

`alpaca_records(n, seed)` gives instruction/input/output records; `generic_text(n, seed)` gives plain
sentences for warming up a random-weight model before the study's runs (no prompt template in them).
"""

from __future__ import annotations

import random

WORDS = (
    "apple river stone cloud green quick house light music paper table water yellow happy small "
    "bread chair dream field glass heart island lemon money night ocean plant queen robot "
    "smile tiger under voice winter zebra blue red black white cat dog bird fish tree sun moon star"
).split()


def _numbers(rng: random.Random, count: int) -> list[int]:
    return [rng.randint(0, 99) for _ in range(count)]


def _words(rng: random.Random, count: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(count)]


def _sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    numbers = _numbers(rng, rng.randint(3, 5))
    return ("Sort the numbers in ascending order.", " ".join(map(str, numbers)),
            " ".join(map(str, sorted(numbers))))


def _add_numbers(rng: random.Random) -> tuple[str, str, str]:
    a, b = _numbers(rng, 2)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng, rng.randint(3, 5))
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _capitalise(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng, rng.randint(2, 4))
    return "Capitalise every word.", " ".join(words), " ".join(w.capitalize() for w in words)


def _repeat_without_input(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng, rng.randint(2, 4))
    return f"Repeat the words: {' '.join(words)}", "", " ".join(words)


TASKS = (_sort_numbers, _add_numbers, _reverse_words, _capitalise, _repeat_without_input)


def alpaca_records(count: int, seed: int = 0) -> list[dict]:
    """`count` Alpaca-format records, the same for the same seed."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        instruction, input_text, output = TASKS[index % len(TASKS)](rng)
        records.append({"instruction": instruction, "input": input_text, "output": output})
    return records


def generic_text(count: int, seed: int = 0) -> list[str]:
    """`count` plain multi-line documents of the tasks' vocabulary, for language-model warm-up.

    Sections under markdown-style headings teach a cold model that text follows a line break, so after
    fine-tuning it answers a prompt instead of ending it at once.
    """
    rng = random.Random(seed + 1)
    sentences = (
        lambda: f"The {rng.choice(WORDS)} is near the {rng.choice(WORDS)}.",
        lambda: " ".join(_words(rng, rng.randint(3, 8))) + ".",
        lambda: " ".join(map(str, _numbers(rng, rng.randint(3, 6)))),
        lambda: " ".join(w.capitalize() for w in _words(rng, rng.randint(2, 5))),
        lambda: f"{rng.choice(WORDS).capitalize()} and {rng.choice(WORDS)} make {rng.randint(0, 99)} words.",
    )
    documents = []
    for _ in range(count):
        sections = []
        for _ in range(rng.randint(1, 3)):
            body = " ".join(rng.choice(sentences)() for _ in range(rng.randint(1, 3)))
            heading = rng.choice(["", f"### {rng.choice(WORDS).capitalize()}:\n", f"{rng.choice(WORDS).capitalize()}:\n"])
            sections.append(heading + body)
        documents.append("\n\n".join(sections))
    return documents
