import json
import threading
import time
from pathlib import Path

import pytest

from qerl.rewards import (
    RewardConfig,
    compute_rewards,
    correctness_reward,
    extract_answer,
    format_reward,
    is_correct,
    normalize_gold,
    overlong_penalty,
    score_batch,
    start_verifiers,
)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"


@pytest.fixture(scope="module")
def gsm8k_rows():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"{GSM8K_TEST} not present")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    return rows


def test_gsm8k_gold_solutions_score_correct(gsm8k_rows):
    wrong = [i for i, r in enumerate(gsm8k_rows) if not is_correct(r["answer"], r["answer"])]
    assert wrong == []
    # The gold may also be given as the bare final answer.
    assert all(is_correct(r["answer"], normalize_gold(r["answer"])) for r in gsm8k_rows)


def test_gsm8k_other_rows_answers_score_wrong(gsm8k_rows):
    def final(r):
        return normalize_gold(r["answer"]).replace(",", "")

    pairs = [(a, b) for a, b in zip(gsm8k_rows, gsm8k_rows[1:] + gsm8k_rows[:1]) if final(a) != final(b)]
    assert len(pairs) > 1250
    accepted = [(final(a), final(b)) for a, b in pairs if is_correct(a["answer"], b["answer"])]
    assert accepted == []


def test_gsm8k_integers_need_no_worker_process():
    # 1319 comparisons above run in milliseconds; here the fast path is timed directly.
    start = time.perf_counter()
    for i in range(2000):
        assert is_correct(f"So the total is {i + 1000:,} dollars.", f"#### {i + 1000}")
        assert not is_correct(f"#### {i}", str(i + 1))
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{14}{3}", r"\frac{14}{3}"),
        (r"3\sqrt{13}", r"3\sqrt{13}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})"),
        (r"90^\circ", "90"),
        (r"\text{(C)}", "C"),
        ("1,000", "1000"),
        (r"50\%", "50"),
        (r"[1, 2)", r"[1,2)"),
        (r"\{1, 2\}", r"\{2, 1\}"),
        (r"10\text{ cm}", "10"),
        (r"\$18.00", "18"),
        ("-3", "-3"),
        ("3/4", "0.75"),
    ],
)
def test_latex_equivalences(pred, gold):
    assert is_correct(rf"The answer is $\boxed{{{pred}}}$.", gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"3\sqrt{12}", r"3\sqrt{13}"),
        (r"3\sqrt{13}", "3"),  # a leading coefficient must not pass for the whole answer
        (r"\frac{1}{3}", "0.5"),
        (r"\left( 3, \frac{\pi}{3} \right)", r"(3, \frac{\pi}{2})"),
        (r"[1, 2]", r"[1,2)"),
        (r"\text{(B)}", "C"),
        ("1,001", "1000"),
        ("17", "18"),
    ],
)
def test_latex_non_equivalences(pred, gold):
    assert not is_correct(rf"\boxed{{{pred}}}", gold)


def test_math_solution_as_gold():
    solution = r"We get $x = \frac{3}{6} = \boxed{\frac{1}{2}}$."
    assert normalize_gold(solution) == r"\frac{1}{2}"
    assert is_correct("<answer>0.5</answer>", solution)
    assert not is_correct("<answer>0.25</answer>", solution)


def test_normalize_gold():
    assert normalize_gold("2 + 3 = <<2+3=5>>5\n#### 5") == "5"
    assert normalize_gold("#### 1,000") == "1,000"
    assert normalize_gold(r"so \boxed{1} or rather \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert normalize_gold(r"  \frac{\pi}{2} ") == r"\frac{\pi}{2}"
    assert normalize_gold("#### ") is None
    assert normalize_gold(r"\boxed{5") is None
    assert normalize_gold("") is None


MIXED = "Work: 2 + 3 = 5.\n#### 7\n<answer>8</answer>\n\\boxed{9}\nI also checked 10"


def test_extraction_order_default_and_fallbacks():
    assert extract_answer(MIXED) == "9"  # boxed beats answer tag
    no_box = MIXED.replace("\\boxed{9}", "")
    assert extract_answer(no_box) == "8"  # answer tag beats ####
    no_tag = no_box.replace("<answer>8</answer>", "")
    assert extract_answer(no_tag) == "7"  # #### beats the last number
    assert extract_answer(no_tag.replace("#### 7", "")) == "10"
    assert extract_answer("no digits here") is None


def test_extraction_order_is_configurable():
    assert extract_answer(MIXED, ("answer_tag", "boxed")) == "8"
    assert extract_answer(MIXED, ("hash",)) == "7"
    assert extract_answer(MIXED, ("last_number",)) == "10"
    assert extract_answer("\\boxed{9}", ("answer_tag", "hash")) is None
    assert is_correct(MIXED, "9")
    assert not is_correct(MIXED, "9", order=("answer_tag",))
    assert is_correct(MIXED, "8", order=("answer_tag",))
    with pytest.raises(ValueError, match="unknown"):
        extract_answer(MIXED, ("boxed", "regex"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
        (r"\boxed{1} then \fbox{2}", "2"),
        (r"first \boxed{3}, final \boxed{4", "3"),  # truncated final box: last complete one
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        ("<answer> 12 </answer> and <answer>13</answer>", "13"),
        ("<answer></answer> 14", "14"),  # empty tag counts as no tag
        ("#### 15\nextra line 99", "15"),
        ("The total is 1,234.5 dollars.", "1,234.5"),
        ("The answer is -7.", "-7"),
        ("5-3=2", "2"),
        ("(5)-3", "3"),
        ("About 3/4 of them", "3/4"),
    ],
)
def test_extraction_cases(text, expected):
    assert extract_answer(text) == expected


def _warm_worker(tag: int) -> None:
    # A fresh comparison that needs math-verify, so a worker is running before a timed call.
    assert is_correct(rf"\boxed{{{tag} + x}}", f"x + {tag}")


@pytest.mark.parametrize(
    "pred",
    [r"9^{9^{9^{9^9}}}", "(" * 5000 + "1" + ")" * 5000],
    ids=["tower", "nested-10k-chars"],
)
def test_pathological_input_returns_false_within_bound(pred):
    bound = 1.0
    _warm_worker(len(pred))
    start = time.perf_counter()
    assert is_correct(rf"\boxed{{{pred}}}", "2", timeout=bound) is False
    elapsed = time.perf_counter() - start
    assert elapsed < bound + 0.5, elapsed
    # The killed worker is replaced: verification keeps working afterwards.
    assert is_correct(r"\boxed{\frac{2}{4}}", "0.5")


def test_pathological_input_in_thread_returns_false_within_bound():
    bound = 1.0
    _warm_worker(101)
    result = {}

    def run():
        start = time.perf_counter()
        result["value"] = is_correct(r"\boxed{8^{8^{8^{8^8}}}}", "3", timeout=bound)
        result["elapsed"] = time.perf_counter() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert result["value"] is False
    assert result["elapsed"] < bound + 0.5, result["elapsed"]
    # And an ordinary symbolic comparison from a thread still succeeds.
    thread = threading.Thread(target=lambda: result.update(ok=is_correct(r"\boxed{2\sqrt{2}}", r"\sqrt{8}")))
    thread.start()
    thread.join(timeout=30)
    assert result["ok"] is True


def test_a_batch_of_pathological_completions_costs_one_time_bound_not_one_each():
    """compute_rewards scores a batch's math-verify comparisons in parallel: 3 runaway towers under a
    1 s bound take about 1 s together (3 s one after another), and the comparisons beside them get
    their verdicts, in order."""
    bound, towers = 1.0, [rf"\boxed{{{k}^{{{k}^{{{k}^{{{k}^{k}}}}}}}}}" for k in range(3, 6)]
    completions = towers[:2] + [r"\boxed{0.5}", "so 41", "I give up"] + towers[2:]
    golds = ["13"] * 2 + [r"\frac{1}{2}", "42", "1"] + ["13"]
    start_verifiers(len(towers))  # worker startup (~1 s of CPU each, once) is outside the bound
    start = time.perf_counter()
    cfg = RewardConfig(verify_timeout=bound)
    totals, parts = compute_rewards(completions, golds, [5] * 6, 50, cfg, workers=len(towers))
    elapsed = time.perf_counter() - start
    assert parts["correct"] == [0.0] * 2 + [1.0, 0.0, 0.0] + [0.0]
    # Each tower alone runs into the bound (test_pathological_input_returns_false_within_bound):
    # one after another they took at least 3 * bound.
    assert elapsed < 2 * bound, elapsed
    # Symbolic comparisons scored side by side (the default bound) get their right verdicts, in order.
    pairs = [(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True), (r"\boxed{\pi/3}", r"\frac{\pi}{4}", False)]
    assert score_batch([p for p, _, _ in pairs], [g for _, g, _ in pairs]) == [want for _, _, want in pairs]


@pytest.mark.parametrize(
    "completion",
    ["", "\\boxed{", "}}}{{{", "\\boxed{}", "\x00\ud800", "<answer>", "9" * 20000, "\\frac{1}{0}", "####"],
)
def test_never_raises_on_strange_strings(completion):
    assert is_correct(completion, "1", timeout=2.0) is False
    assert is_correct("1", completion, timeout=2.0) is False


def test_reward_functions():
    assert correctness_reward("<answer>4</answer>", "4") == 1.0
    assert correctness_reward("<answer>5</answer>", "4") == 0.0
    assert format_reward("reasoning <answer>4</answer>") == 1.0
    assert format_reward(r"so \boxed{4}") == 1.0
    assert format_reward("the answer is 4") == 0.0
    assert format_reward("<answer>4") == 0.0
    assert format_reward("<answer>  </answer>") == 0.0


def test_overlong_penalty_values():
    # max_len 100, buffer 20: free up to 80 tokens, linear to -1 at 100.
    assert overlong_penalty(50, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(85, 100, 20) == pytest.approx(-0.25)
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(99, 100, 20) == pytest.approx(-0.95)
    assert overlong_penalty(100, 100, 20) == -1.0
    assert overlong_penalty(130, 100, 20) == -1.0
    assert overlong_penalty(90, 100, 20, penalty=2.0) == pytest.approx(-1.0)
    assert overlong_penalty(99, 100, 0) == 0.0
    assert overlong_penalty(100, 100, 0) == -1.0
    with pytest.raises(ValueError):
        overlong_penalty(10, 100, -1)


def test_compute_rewards_combines_weights():
    cfg = RewardConfig(correct=2.0, format=0.2, overlong=1.0, overlong_buffer=10)
    completions = ["<answer>5</answer>", r"\boxed{4}", "it is 5", "no idea"]
    totals, parts = compute_rewards(completions, ["5", "5", "#### 5", "5"], [10, 45, 50, 10], 50, cfg)
    assert parts == {
        "correct": [1.0, 0.0, 1.0, 0.0],
        "format": [1.0, 1.0, 0.0, 0.0],
        "overlong": [0.0, -0.5, -1.0, 0.0],
    }
    assert totals == pytest.approx([2.2, -0.3, 1.0, 0.0])
    # Defaults: correctness only.
    totals, _ = compute_rewards(completions, ["5"] * 4, [10, 45, 50, 10], 50)
    assert totals == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="length mismatch"):
        compute_rewards(completions, ["5"], [1], 50)


def test_qerl_paper_setting():
    cfg = RewardConfig(correct=2.0, format=0.2, answer_order=["answer_tag"])
    assert cfg.answer_order == ("answer_tag",)
    totals, _ = compute_rewards(["<answer>7</answer>", r"\boxed{7}", "7"], ["7"] * 3, [5, 5, 5], 100, cfg)
    assert totals == pytest.approx([2.2, 0.2, 0.0])
    with pytest.raises(ValueError):
        RewardConfig(answer_order=("boxes",))
