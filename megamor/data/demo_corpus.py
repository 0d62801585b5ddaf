"""A deterministic synthetic corpus whose tokens differ sharply in difficulty (for `make demo`).

A small invented world (countries, capitals, rivers, people, years) is fixed by the seed; each
document is one of:
  prose      template narrative: mostly predictable filler and grammar (easy tokens)
  facts      encyclopedia entries stating the world's facts (recallable once learned)
  qa         questions about those facts; the answer must be looked up (medium)
  arithmetic sums, differences and products of multi-digit numbers; the answer digits must
             be computed (hard; digits are single tokens with megamor's tokenizer)
  sequence   arithmetic progressions: the next terms follow from the first two (medium)
Every document also records the character spans of its "answer" tokens (looked-up or computed
values), so an analysis can compare the depth a router gives answers with the rest.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megamor.utils.atomic import atomic_open

KINDS = ("prose", "facts", "qa", "arithmetic", "sequence")
KIND_WEIGHTS = (0.25, 0.2, 0.2, 0.25, 0.1)
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "th", "nd", "sk"]
_JOBS = ["baker", "sailor", "weaver", "astronomer", "miller", "scribe", "smith", "healer", "merchant", "farmer"]
_ANIMALS = ["fox", "heron", "badger", "wolf", "owl", "otter", "stag", "crow"]
_COLOURS = ["red", "grey", "golden", "silver", "green", "blue", "white", "black"]
_WEATHER = ["rain", "snow", "fog", "wind", "sunshine"]


@dataclass
class DemoDoc:
    kind: str
    text: str
    answers: list[tuple[int, int]] = field(default_factory=list)  # char spans of answer tokens


class _Builder:
    """Accumulates text and the spans of the parts marked as answers."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[tuple[int, int]] = []

    def put(self, s: str) -> None:
        self.parts.append(s)
        self.n += len(s)

    def answer(self, s: str) -> None:
        self.spans.append((self.n, self.n + len(s)))
        self.put(s)

    def doc(self, kind: str) -> DemoDoc:
        return DemoDoc(kind, "".join(self.parts), self.spans)


def _name(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return s.capitalize()


class World:
    def __init__(self, seed: int, n_countries: int = 60, n_people: int = 120):
        rng = random.Random(f"world-{seed}")
        used: set[str] = set()

        def fresh(syl: int) -> str:
            while True:
                n = _name(rng, syl)
                if n not in used:
                    used.add(n)
                    return n

        self.countries = []
        for _ in range(n_countries):
            self.countries.append({
                "name": fresh(3), "capital": fresh(2), "river": fresh(2),
                "population": rng.randrange(10, 990) * 1000, "founded": rng.randrange(800, 1900),
                "animal": rng.choice(_ANIMALS), "colour": rng.choice(_COLOURS),
            })
        self.people = []
        for _ in range(n_people):
            c = rng.choice(self.countries)
            self.people.append({"name": fresh(2), "job": rng.choice(_JOBS), "home": c["capital"],
                                "born": rng.randrange(c["founded"], 2000)})


def _prose(rng: random.Random, w: World) -> DemoDoc:
    b = _Builder()
    p = rng.choice(w.people)
    c = rng.choice(w.countries)
    b.put(f"Once upon a time, in the city of {p['home']}, there lived a {p['job']} named {p['name']}. ")
    for _ in range(rng.randrange(3, 8)):
        b.put(rng.choice([
            f"Every morning the {p['job']} walked down to the river and watched the {rng.choice(_ANIMALS)}s. ",
            f"The {rng.choice(_WEATHER)} came early that year, and the people of {p['home']} stayed at home. ",
            f"One day {p['name']} decided to travel to {c['name']}, a land far away. ",
            f"The road was long, and the nights were cold, but {p['name']} did not give up. ",
            f"At the market there were {rng.choice(_COLOURS)} flags and the smell of fresh bread. ",
            f"{p['name']} met an old friend who told stories about the {rng.choice(_COLOURS)} {rng.choice(_ANIMALS)}. ",
        ]))
    b.put(f"And so {p['name']} the {p['job']} returned to {p['home']}, happy at last.")
    return b.doc("prose")


def _facts(rng: random.Random, w: World) -> DemoDoc:
    b = _Builder()
    c = rng.choice(w.countries)
    b.put(f"{c['name']}\n\n{c['name']} is a country. Its capital is ")
    b.answer(c["capital"])
    b.put(". The river ")
    b.answer(c["river"])
    b.put(f" flows through {c['name']}. It was founded in ")
    b.answer(str(c["founded"]))
    b.put(" and has a population of ")
    b.answer(str(c["population"]))
    b.put(". Its national animal is the ")
    b.answer(c["animal"])
    b.put(" and its flag is ")
    b.answer(c["colour"])
    b.put(".")
    for p in rng.sample(w.people, 2):
        b.put(f"\n{p['name']} was a {p['job']} from ")
        b.answer(p["home"])
        b.put(", born in ")
        b.answer(str(p["born"]))
        b.put(".")
    return b.doc("facts")


def _qa(rng: random.Random, w: World) -> DemoDoc:
    b = _Builder()
    for i in range(rng.randrange(4, 9)):
        if i:
            b.put("\n")
        c = rng.choice(w.countries)
        p = rng.choice(w.people)
        q, a = rng.choice([
            (f"What is the capital of {c['name']}?", c["capital"]),
            (f"Which river flows through {c['name']}?", c["river"]),
            (f"When was {c['name']} founded?", str(c["founded"])),
            (f"What is the national animal of {c['name']}?", c["animal"]),
            (f"Where does {p['name']} come from?", p["home"]),
            (f"In which year was {p['name']} born?", str(p["born"])),
            (f"What does {p['name']} do?", p["job"]),
        ])
        b.put(f"Q: {q}\nA: ")
        b.answer(a)
    return b.doc("qa")


def _arithmetic(rng: random.Random) -> DemoDoc:
    b = _Builder()
    for i in range(rng.randrange(5, 12)):
        if i:
            b.put("\n")
        op = rng.choice("+-*")
        if op == "*":
            x, y = rng.randrange(2, 100), rng.randrange(2, 100)
            r = x * y
        else:
            digits = rng.choice([2, 3, 4])
            x, y = rng.randrange(10 ** (digits - 1), 10**digits), rng.randrange(10 ** (digits - 1), 10**digits)
            if op == "-" and y > x:
                x, y = y, x
            r = x + y if op == "+" else x - y
        if rng.random() < 0.5:
            b.put(f"{x} {op} {y} = ")
            b.answer(str(r))
        else:
            word = {"+": "sum", "-": "difference", "*": "product"}[op]
            b.put(f"The {word} of {x} and {y} is ")
            b.answer(str(r))
            b.put(".")
    return b.doc("arithmetic")


def _sequence(rng: random.Random) -> DemoDoc:
    b = _Builder()
    for i in range(rng.randrange(3, 7)):
        if i:
            b.put("\n")
        a, d = rng.randrange(1, 200), rng.randrange(2, 30)
        b.put(f"Continue the sequence: {a}, {a + d}, ")
        for k in range(2, rng.randrange(5, 9)):
            if k > 2:
                b.put(", ")
            b.answer(str(a + k * d))
    return b.doc("sequence")


def generate(seed: int = 0, target_bytes: int = 4_000_000) -> Iterator[DemoDoc]:
    """Documents until their UTF-8 size (plus newlines) reaches target_bytes; same seed, same docs."""
    world = World(seed)
    rng = random.Random(f"docs-{seed}")
    size = 0
    while size < target_bytes:
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        if kind == "prose":
            doc = _prose(rng, world)
        elif kind == "facts":
            doc = _facts(rng, world)
        elif kind == "qa":
            doc = _qa(rng, world)
        elif kind == "arithmetic":
            doc = _arithmetic(rng)
        else:
            doc = _sequence(rng)
        size += len(doc.text) + 1
        yield doc


def write_demo_corpus(path: str | Path, seed: int = 0, target_bytes: int = 4_000_000) -> dict[str, int]:
    """Write the corpus as jsonl ({"text", "kind", "answers"} per line); returns documents per kind."""
    counts = dict.fromkeys(KINDS, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        for doc in generate(seed, target_bytes):
            counts[doc.kind] += 1
            f.write(json.dumps({"text": doc.text, "kind": doc.kind, "answers": doc.answers}, ensure_ascii=False))
            f.write("\n")
    return counts
