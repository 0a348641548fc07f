"""Task scoring: answer extraction and normalisation, the prompt variants, the problem file's
checks (bad lines named), the Wilson interval."""
from __future__ import annotations

import json

import pytest

from pipeline.engine.errors import KilnError
from pipeline.evaluation.tasks import correct, extract, load_problems, normalise, user_prompt, wilson


@pytest.mark.parametrize(("text", "answer", "right"), [
    ("Step 1: 3+4=7. So the answer is \\boxed{7}.", "7", True),
    ("Quick answer: \\boxed{5}. Verification: 2+4 = 6, so \\boxed{6}", "6", True),   # the last box counts
    ("He pays $1,250.00 in total.", "1250", True),                                 # no box: the last number
    ("\\boxed{\\$1,250}", "1250", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{12\\%}", "12", True),
    ("\\boxed{42 apples}", "42", True),
    ("The answer is \\boxed{4", "4", True),        # cut off inside the box: its digits, as Qwen2.5-Math's scorer
    ("I think it is 8. Final: \\boxed{9}", "8", False),
    ("no number here", "3", False),
])
def test_answers_are_extracted_and_compared_as_numbers(text, answer, right):
    assert correct(text, answer) is right


def test_truncated_box_falls_back_to_the_last_number_of_the_text():
    assert extract("so 3 + 4 = 7, the answer is \\boxed{7") == "7"
    assert normalise("1,000,000") == 1e6 and normalise("-.5") == -0.5 and normalise("abc") is None


def test_budget_aware_prompt_states_half_the_budget_and_the_others_do_not():
    assert user_prompt("budget_aware", "What is 2+2?", 128).endswith("You MUST respond in **UNDER 64 tokens**")
    assert user_prompt("step_by_step", "What is 2+2?", 128) == "What is 2+2?"


def test_problem_file_lines_are_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps({"question": "What is 2+3?", "answer": 5}),
                               json.dumps({"question": "Half of 9?", "answer": "4.5"})]) + "\n")
    assert [p.answer for p in load_problems(path, "p.jsonl")] == ["5", "4.5"]
    for line, problem in [("{not json", r"p.jsonl:2: not JSON"),
                          (json.dumps({"question": "", "answer": 1}), r"p.jsonl:2: question"),
                          (json.dumps({"question": "Q?", "answer": "many"}), r"p.jsonl:2: answer: a number"),
                          (json.dumps({"question": "Q?", "answer": True}), r"p.jsonl:2: answer"),
                          (json.dumps(["Q?", 1]), r"p.jsonl:2: a problem is an object")]:
        path.write_text(json.dumps({"question": "What is 2+3?", "answer": 5}) + "\n" + line + "\n")
        with pytest.raises(KilnError, match=problem):
            load_problems(path, "p.jsonl")
    path.write_text("\n\n")
    with pytest.raises(KilnError, match="no problems"):
        load_problems(path, "p.jsonl")


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_run_tasks_generates_unstated_budgets_once_and_cuts_them():
    from pipeline.evaluation.tasks import Problem, run_tasks

    calls = []

    def generate(system: str, user: str, budget: int) -> list[int]:  # ids are digits of the reply "1 2 ... 9"
        calls.append((system[:30], user, budget))
        return list(range(1, 10))[:budget]

    problems = [Problem("Q one?", "4"), Problem("Q two?", "9")]
    accuracy, answers = run_tasks(problems, ["step_by_step", "budget_aware"], [4, 9], generate,
                                  lambda ids: " ".join(map(str, ids)), "test")
    assert [c[2] for c in calls] == [9, 4, 9, 9, 4, 9]  # per problem: one cut generation, then one per budget
    assert "UNDER 2 tokens" in calls[1][1] and "UNDER 4 tokens" in calls[2][1]
    # the last number of "1 2 3 4" is 4 (right for problem one), of "1 … 9" is 9 (right for problem two)
    assert accuracy["step_by_step"]["4"]["correct"] == 1 and accuracy["step_by_step"]["9"]["correct"] == 1
    assert accuracy["budget_aware"]["9"]["mean_tokens"] == 9 and len(answers) == 2 * 2 * 2


def test_budgets_come_back_in_numeric_order_after_the_json_round_trip():
    """tasks.json has sorted keys ("128" < "32" as text); tables and curves must follow the budgets."""
    import json

    from pipeline.evaluation.page import budget_rows

    rows = {str(b): {"accuracy": b / 1000, "ci95": [0, 1]} for b in (32, 64, 128, 256)}
    stored = json.loads(json.dumps({"accuracy": {"step_by_step": rows}}, sort_keys=True))
    assert list(stored["accuracy"]["step_by_step"]) == ["128", "256", "32", "64"]  # what the file holds
    assert [b for b, _ in budget_rows(stored["accuracy"]["step_by_step"])] == [32, 64, 128, 256]


def test_a_variant_keeps_its_colour_in_a_plot_that_leaves_another_out(tmp_path):
    """The latency plots leave out a variant without a device speed: the others keep the colours
    they have in the budget plots (matplotlib's cycle would shift them)."""
    import re

    from pipeline.evaluation.plots import accuracy_curves

    point = [(32.0, 0.2, 0.1, 0.3), (64.0, 0.3, 0.2, 0.4)]
    variants = ["Q2_K", "Q4_K_M", "Q8_0"]
    accuracy_curves(dict.fromkeys(variants, point), tmp_path / "all.svg", "t", "x", variants)
    accuracy_curves({"Q2_K": point, "Q8_0": point}, tmp_path / "some.svg", "t", "x", variants)

    def strokes(name: str) -> set[str]:
        return set(re.findall(r"stroke: (#[0-9a-f]{6})", (tmp_path / name).read_text())) - {"#000000", "#b0b0b0", "#cccccc"}

    assert len(strokes("all.svg")) == 3
    assert strokes("some.svg") == strokes("all.svg") - {"#ff7f0e"}  # C1, Q4_K_M's, is the one missing
