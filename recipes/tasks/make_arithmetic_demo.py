"""Writes kiln_arithmetic_demo.jsonl: Kiln's own grade-school arithmetic word problems for the
task-accuracy demo. NOT GSM8K: small numbers, one or two steps, so that a 135M model answers a
fair share of them (GSM8K is far beyond it). Deterministic (seeded); run from the repository
root: `.venv/bin/python recipes/tasks/make_arithmetic_demo.py`."""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Yuki"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def one(rng: random.Random, kind: int) -> dict[str, object]:
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
    problems = [one(rng, i % 5) for i in range(120)]
    out = Path(__file__).with_name("kiln_arithmetic_demo.jsonl")
    out.write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in problems))
    print(f"wrote {len(problems)} problems to {out}")


if __name__ == "__main__":
    main()
