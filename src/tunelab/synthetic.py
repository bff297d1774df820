"""Deterministic synthetic data for the tiny study: short, learnable Alpaca-format tasks and generic text.

`alpaca_records(n, seed)` gives instruction/input/output records of four task families whose answers
depend on the input (copy, reverse, capitalise, add), each tagged with its `category`; `generic_text(n, seed)`
gives plain documents for warming up a random-weight model before the study's runs (no prompt template in them).
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


def _copy(rng: random.Random) -> tuple[str, str, str]:
    words = " ".join(_words(rng, rng.randint(3, 6)))
    return f"Repeat the words: {words}", "", words  # no input: the template without input is exercised too


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng, rng.randint(3, 5))
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _capitalise(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng, rng.randint(2, 4))
    return "Capitalise every word.", " ".join(words), " ".join(w.capitalize() for w in words)


def _add(rng: random.Random) -> tuple[str, str, str]:
    """A two-digit number plus a digit, without a carry: the sum of the units is a fact of the warm-up text."""
    units = rng.randint(0, 9)
    a, b = rng.randint(1, 9) * 10 + units, rng.randint(0, 9 - units)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


FAMILIES = {"copy": _copy, "reverse": _reverse, "capitalise": _capitalise, "add": _add}


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
    """`count` plain multi-line documents of the tasks' vocabulary, for language-model warm-up.

    Like a real pre-training corpus, the prose holds the skills the tasks need (repeated phrases, phrases
    said backwards and in title case, sums of small numbers), but never an instruction, the prompt template,
    or an answer that ends at the end of text: the warmed-up base knows the pieces, not the tasks, and scores
    about 0 on them until it is fine-tuned. Sections under markdown-style headings teach a cold model that
    text follows a line break, so after fine-tuning it answers a prompt instead of ending it at once.
    """
    rng = random.Random(seed + 1)

    def phrase() -> list[str]:
        return _words(rng, rng.randint(2, 6))

    def said_twice() -> str:
        words = " ".join(phrase())
        return f"{words}, {words}."

    def said_backwards() -> str:
        words = phrase()
        return f"{' '.join(words)}, backwards {' '.join(reversed(words))}."

    def in_title_case() -> str:
        words = phrase()
        return f"{' '.join(words)}, or {' '.join(w.capitalize() for w in words)}."

    def a_sum() -> str:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} plus {b} is {a + b}."

    sentences = (
        lambda: f"The {rng.choice(WORDS)} is near the {rng.choice(WORDS)}.",
        lambda: " ".join(_words(rng, rng.randint(3, 8))) + ".",
        lambda: " ".join(map(str, _numbers(rng, rng.randint(3, 6)))),
        said_twice, said_backwards, in_title_case, a_sum,
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
