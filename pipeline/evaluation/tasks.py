"""Task accuracy under token budgets: the problem file, the prompt variants, answer extraction
and scoring, confidence intervals.

Prompt variants (the wording of a published RK3568 study of Llama-3.1-8B Q2_K vs Q8_0 on GSM8K):
`step_by_step` (reason step by step, answer in \\boxed{}), `answer_and_verify` (a quick answer
first, then a verified one: robust to truncation) and `budget_aware` (answer-and-verify plus "You
MUST respond in UNDER {budget/2} tokens": models overrun a stated budget, so half of it is
stated). Extraction follows Qwen2.5-Math's scorer for GSM8K: the last \\boxed{...}, else the
last number of the text; answers compare as numbers after the usual normalisation
(thousands separators, currency, units, trailing period, simple fractions and percentages).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.engine.errors import KilnError

PromptVariant = Literal["step_by_step", "answer_and_verify", "budget_aware"]
PROMPT_VARIANTS: tuple[PromptVariant, ...] = ("step_by_step", "answer_and_verify", "budget_aware")
_BOXED = r"Conclude with your final answer within \boxed{}."
SYSTEM = {
    "step_by_step": "Follow this pattern to solve the problem:\nProvide a revised answer through step-by-step "
                    f"reasoning.\n{_BOXED}",
    "answer_and_verify": "Follow this pattern to solve the problem:\nQuick Answer: Give an initial answer via "
                         "intuition or quick calculation.\nVerification: Provide a revised answer through step-by-step "
                         f"reasoning and correct any mistakes.\n{_BOXED}",
}
SYSTEM["budget_aware"] = SYSTEM["answer_and_verify"]
MAX_FILE_BYTES = 16 << 20
MAX_PROBLEMS = 100_000
MAX_QUESTION_CHARS = 4000
MAX_ANSWER_CHARS = 64


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def load_problems(path: Path, shown: str) -> list[Problem]:
    """A JSONL file of {"question": str, "answer": str | number} records, bounded and checked;
    errors name the file and line."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise KilnError(f"{shown}: {path.stat().st_size} bytes; problem files are at most {MAX_FILE_BYTES}")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{shown}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise KilnError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise KilnError(f"{where}: a problem is an object with `question` and `answer`")
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip() or len(question) > MAX_QUESTION_CHARS:
            raise KilnError(f"{where}: question: a non-empty string of at most {MAX_QUESTION_CHARS} characters")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or normalise(str(answer)) is None \
                or len(str(answer)) > MAX_ANSWER_CHARS:
            raise KilnError(f"{where}: answer: a number (or a string holding one), got {answer!r}")
        problems.append(Problem(question.strip(), str(answer)))
        if len(problems) > MAX_PROBLEMS:
            raise KilnError(f"{shown}: more than {MAX_PROBLEMS} problems")
    if not problems:
        raise KilnError(f"{shown}: no problems")
    return problems


def user_prompt(variant: PromptVariant, question: str, budget: int) -> str:
    """The user turn; the budget-aware variant states half the token budget."""
    if variant == "budget_aware":
        return f"{question}\nYou MUST respond in **UNDER {int(budget * 0.5)} tokens**"
    return question


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces kept), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
        j += 1
    return None  # cut off inside the box (a budget ran out)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$|^(-?[\d.]+)/(-?[\d.]+)$")


def normalise(answer: str) -> float | None:
    """A number from an answer string: `$1,250.00`, `1250 dollars`, `12%` (12), `\\frac{3}{4}`, `3/4`, `7.`."""
    s = answer.strip().replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s).rstrip(".")
    if m := _FRAC.match(s):
        a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        try:
            return float(a) / float(b) if float(b) else None
        except ValueError:
            return None
    found = _NUMBER.findall(s)  # "12%" is 12: a percentage question's answer is the number of percent
    if not found:
        return None
    try:
        return float(found[0].replace(",", ""))
    except ValueError:
        return None


def extract(text: str) -> str | None:
    """The model's final answer: the last \\boxed{}, else the last number in the text."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def correct(text: str, answer: str) -> bool:
    got = extract(text)
    want, value = normalise(answer), normalise(got) if got is not None else None
    return value is not None and want is not None and math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-9)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def budget_curves(results: dict[str, dict], prompt: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per variant (quant type): (budget, accuracy, CI low, CI high) of one prompt variant."""
    return {t: [(float(b), r["accuracy"], *r["ci95"]) for b, r in res["accuracy"][prompt].items()]
            for t, res in results.items() if prompt in res["accuracy"]}


def latency_curves(results: dict[str, dict], prompt: str, latency: dict) -> tuple[dict, str, list[str]]:
    """Accuracy against generation time at equal latency: a budget of B tokens takes B / speed of
    each variant. Returns (curves, x-axis label, variants left out for want of a speed)."""
    speeds = latency["tokens_per_s"] or latency["relative_speed"]
    unit = "seconds of generation" if latency["tokens_per_s"] else "generation time (one token of the slowest variant = 1)"
    curves = {t: [(b / speeds[t], a, lo, hi) for b, a, lo, hi in points]
              for t, points in budget_curves(results, prompt).items() if t in speeds}
    return curves, unit, sorted(t for t in results if t not in speeds)


# A backend's greedy reply: (system prompt, user prompt, most tokens) → the reply's token ids
# (the model's tokenizer's ids, at most that many).
Generate = Callable[[str, str, int], list[int]]


def run_tasks(problems: list[Problem], prompts: list[PromptVariant], budgets: list[int], generate: Generate,
              decode: Callable[[list[int]], str], label: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every problem with every prompt variant at every budget: (accuracy per prompt and budget
    with 95% Wilson intervals, every reply). A prompt that states no budget is generated once at
    the largest and cut to each smaller one; the budget-aware one once per budget."""
    from pipeline.engine.progress import progress

    answers, tally = [], {v: {b: [0, 0, 0] for b in budgets} for v in prompts}  # correct, n, tokens
    for i, problem in progress(enumerate(problems), label, "problem", len(problems)):
        for variant in prompts:
            once = None if variant == "budget_aware" else generate(SYSTEM[variant], problem.question, budgets[-1])
            for budget in budgets:
                ids = once[:budget] if once is not None else \
                    generate(SYSTEM[variant], user_prompt(variant, problem.question, budget), budget)
                text = decode(ids)
                right = correct(text, problem.answer)
                row = tally[variant][budget]
                row[0], row[1], row[2] = row[0] + right, row[1] + 1, row[2] + len(ids)
                answers.append({"problem": i, "prompt": variant, "budget": budget, "tokens": len(ids),
                                "extracted": extract(text), "answer": problem.answer, "correct": right, "text": text})
    accuracy = {v: {str(b): {"correct": c, "n": n, "accuracy": c / n, "ci95": list(wilson(c, n)), "mean_tokens": t / n}
                    for b, (c, n, t) in rows.items()} for v, rows in tally.items()}
    return accuracy, answers
