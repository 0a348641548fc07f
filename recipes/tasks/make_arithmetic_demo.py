"""Writes kiln_arithmetic_demo.jsonl: Kiln's own one-step arithmetic problems for the task-accuracy
demo, word problems and bare expressions in turn. NOT GSM8K: numbers below 10, one step, so that
a 135M model answers a fair share of them (GSM8K is far beyond it). Why the mix: on the word
problems alone SmolLM2-135M's Q8_0 scored 16-19% at 256 tokens (100 problems, 2026-12-02), on bare
expressions 40-76% (25-problem probes): half of each puts it inside 20-80% with every prompt.
Deterministic (seeded); run from the repository root:
`.venv/bin/python recipes/tasks/make_arithmetic_demo.py`."""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Yuki"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def expression(rng: random.Random, kind: int) -> dict[str, object]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if kind == 0:
        return {"question": f"What is {a} + {b}?", "answer": a + b}
    if kind == 1:
        a, b = max(a, b) + 2, min(a, b)
        return {"question": f"What is {a} - {b}?", "answer": a - b}
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    return {"question": f"What is {a} times {b}?", "answer": a * b}


def word_problem(rng: random.Random, kind: int) -> dict[str, object]:
    name = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if kind in (0, 1, 2):
        return {"question": f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have "
                            "now?", "answer": a + b}
    if kind == 3:
        a, b = max(a, b) + 2, min(a, b)
        return {"question": f"{name} has {a} {thing}. {name} gives away {b} {thing}. How many {thing} does {name} "
                            "have left?", "answer": a - b}
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    return {"question": f"{name} has {a} bags. Each bag holds {b} {thing}. How many {thing} are there in all?",
            "answer": a * b}


def main() -> None:
    rng = random.Random(20261202)
    problems = [word_problem(rng, i // 2 % 5) if i % 2 == 0 else expression(rng, i // 2 % 3) for i in range(120)]
    out = Path(__file__).with_name("kiln_arithmetic_demo.jsonl")
    out.write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in problems))
    print(f"wrote {len(problems)} problems to {out}")


if __name__ == "__main__":
    main()
