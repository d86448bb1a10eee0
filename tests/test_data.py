import json
import logging
import re
import sys
from pathlib import Path

import pytest

from qerl.data import (
    DEFAULT_SUFFIX,
    QERL_SUFFIX,
    DataError,
    Record,
    arithmetic_records,
    build_prompt,
    load_records,
)

ROWS = [
    {"question": "What is 2 + 3?", "answer": "Add them: 2 + 3 = 5.\n#### 5", "id": "a"},
    {"problem": "Simplify 2/4.", "solution": r"We get $\boxed{\frac{1}{2}}$.", "level": 2},
    {"prompt": "How many legs has a cat?", "final_answer": 4},
]


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_rows(records):
    assert [(r.question, r.answer) for r in records] == [
        ("What is 2 + 3?", "5"),
        ("Simplify 2/4.", r"\frac{1}{2}"),
        ("How many legs has a cat?", "4"),
    ]
    assert records[0].meta["id"] == "a" and records[0].meta["raw_answer"].endswith("#### 5")
    assert records[1].meta["level"] == 2


def test_jsonl_round_trip(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    records, report = load_records(str(path))
    _check_rows(records)
    assert [r.meta["line"] for r in records] == [1, 2, 3]
    assert (report.rows, report.kept, report.skipped) == (3, 3, {})
    assert report.summary() == f"{path} [train]: kept 3 of 3 lines"


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows}], ids=["list", "data-key"])
def test_json_round_trip(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap(ROWS)))
    records, report = load_records(str(path))
    _check_rows(records)
    assert [r.meta["row"] for r in records] == [1, 2, 3]


def test_json_with_wrong_shape(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match=r"expected a list of objects.*d\.json"):
        load_records(str(path))


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"question": r.get("question") or r.get("problem") or r["prompt"], "answer": a} for r, a in
            zip(ROWS, [ROWS[0]["answer"], ROWS[1]["solution"], "4"])]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    records, report = load_records(str(tmp_path), "test")  # directory + split
    assert [r.answer for r in records] == ["5", r"\frac{1}{2}", "4"]
    assert report.source.endswith("test.parquet")


def test_parquet_without_pyarrow_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="needs pyarrow: pip install pyarrow") as info:
        load_records(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_directory_picks_split_file(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [json.dumps(ROWS[0])])
    (tmp_path / "test.json").write_text(json.dumps(ROWS[1:]))
    assert [r.answer for r in load_records(str(tmp_path), "train")[0]] == ["5"]
    assert [r.answer for r in load_records(str(tmp_path), "test")[0]] == [r"\frac{1}{2}", "4"]
    with pytest.raises(DataError, match="no validation.jsonl"):
        load_records(str(tmp_path), "validation")


def test_column_mapping_overrides(tmp_path):
    rows = [{"q": "Q1", "question": "ignored", "gold": "7", "answer": "ignored"}, {"q": "Q2", "gold": "8"}]
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    records, _ = load_records(str(path), question_key="q", answer_key="gold")
    assert [(r.question, r.answer) for r in records] == [("Q1", "7"), ("Q2", "8")]
    # The first present default key wins: "answer" before "solution".
    path2 = _write_jsonl(tmp_path / "e.jsonl", [json.dumps({"problem": "P", "solution": r"\boxed{3}", "answer": "3"})])
    record = load_records(str(path2))[0][0]
    assert (record.answer, record.meta["solution"]) == ("3", r"\boxed{3}")


def test_malformed_rows_counted_by_reason(tmp_path, caplog):
    lines = [
        json.dumps(ROWS[0]),  # 1 ok
        "{not json",  # 2 invalid JSON
        json.dumps({"question": "no answer"}),  # 3 missing answer
        json.dumps({"question": "Q", "answer": None}),  # 4 empty answer
        json.dumps({"question": 5, "answer": "5"}),  # 5 non-string question
        "",  # blank: layout, not a row
        json.dumps({"answer": "1"}),  # 7 missing question
        json.dumps({"question": "Q", "answer": "  "}),  # 8 empty answer
        json.dumps([1, 2]),  # 9 not an object
        json.dumps({"question": "Q", "answer": "#### "}),  # 10 no final answer
        json.dumps({"question": "Q", "answer": ["5"]}),  # 11 non-string answer
        json.dumps({"question": "Q", "answer": "Q says 9 so\n#### 9"}),  # 12 ok
        "[",  # 13 invalid JSON
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="qerl.data"):
        records, report = load_records(str(path))
    assert [r.answer for r in records] == ["5", "9"]
    assert report.skipped == {
        "invalid JSON": 2,
        "missing answer": 1,
        "empty answer": 2,
        "non-string question": 1,
        "missing question": 1,
        "not an object": 1,
        "no final answer in solution": 1,
        "non-string answer": 1,
    }
    assert report.examples["invalid JSON"] == [2, 13]
    assert report.examples["empty answer"] == [4, 8]
    assert (report.rows, report.kept, report.n_skipped) == (12, 2, 10)
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith(f"{path} [train]: kept 2 of 12 lines; skipped 10: ")
    assert "invalid JSON x2 (lines 2, 13)" in summary
    assert "no final answer in solution x1 (line 10)" in summary
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [summary]


def test_examples_are_capped_in_summary(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0])] + ["x"] * 5)
    summary = load_records(str(path))[1].summary()
    assert "invalid JSON x5 (lines 2, 3, 4, ...)" in summary


def test_missing_and_empty_sources_raise(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {re.escape(str(missing))}"):
        load_records(str(missing))
    assert issubclass(DataError, ValueError)
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", ["{", json.dumps({"question": "Q"})])
    with pytest.raises(DataError, match="no valid rows in .*bad.jsonl.*invalid JSON x1") as info:
        load_records(str(only_bad))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="invalid JSON in .*broken.json"):
        load_records(str(_write_jsonl(tmp_path / "broken.json", ["[1,"])))


def test_hub_name_without_datasets_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"openai/gsm8k.*pip install 'qerl\[hub\]'") as info:
        load_records("openai/gsm8k")
    assert "\n" not in str(info.value)
    # The extra the message names exists and installs datasets.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(d.startswith("datasets") for d in pyproject["project"]["optional-dependencies"]["hub"])


def test_limit_keeps_first_valid_records(tmp_path):
    lines = ["bad"] + [json.dumps({"question": f"Q{i}", "answer": str(i)}) for i in range(10)]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    records, report = load_records(str(path), limit=3)
    assert [r.answer for r in records] == ["0", "1", "2"]
    assert "stopped at limit=3" in report.summary()


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_by_seed():
    a = arithmetic_records(50, seed=3)
    assert a == arithmetic_records(50, seed=3)
    assert [r.question for r in a] != [r.question for r in arithmetic_records(50, seed=4)]
    assert load_records("arithmetic", limit=20, seed=1)[0] == load_records("arithmetic", limit=20, seed=1)[0]


def test_arithmetic_default_sizes_and_disjoint_splits():
    train, report = load_records("arithmetic")
    test, _ = load_records("arithmetic", "test")
    assert (len(train), len(test)) == (2000, 200)
    assert report.summary() == "arithmetic [train]: kept 2000 of 2000 rows"
    assert len({r.question for r in train}) == 2000
    assert not {r.question for r in train} & {r.question for r in test}
    # Disjoint whatever the sizes and seeds.
    big_train = {r.question for r in load_records("arithmetic:2", limit=5000, seed=7)[0]}
    assert not big_train & {r.question for r in load_records("arithmetic:2", "test", limit=500, seed=8)[0]}


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_answers_are_correct(difficulty):
    records = arithmetic_records(300, seed=0, difficulty=difficulty)
    for r in records:
        expr = r.meta["expression"]
        # The expression's numbers are the question's numbers, in order.
        assert re.findall(r"\d+", r.question) == re.findall(r"\d+", expr), r.question
        assert int(r.answer) == eval(expr) >= 0  # built from integers and + - * only
        operands = [int(x) for x in re.findall(r"\d+", expr)]
        ops = re.findall(r"[-+*]", expr)
        if difficulty == 1:
            assert ops == ["+"] and all(1 <= x <= 9 for x in operands)
        elif difficulty == 2:
            assert len(ops) == 1 and ops[0] in "+-" and all(10 <= x <= 99 for x in operands)
        elif difficulty == 3:
            assert len(operands) == 3 and set(ops) <= {"+", "-"}
        else:
            assert "*" in ops
    if difficulty >= 2:
        assert {"+", "-"} <= {op for r in records for op in re.findall(r"[-+*]", r.meta["expression"])}
    assert len({r.question.split()[0] for r in records}) > 5  # varied names/phrasing


def test_arithmetic_level_one_reads_simply():
    r = arithmetic_records(1, seed=0)[0]
    assert isinstance(r, Record) and r.question.endswith("?") and len(r.question) < 140


def test_arithmetic_bad_arguments():
    with pytest.raises(DataError, match="difficulty"):
        load_records("arithmetic:9")
    with pytest.raises(DataError, match="difficulty"):
        load_records("arithmetic:hard")
    with pytest.raises(DataError, match="splits"):
        load_records("arithmetic", "validation")


# --------------------------------------------------------------------------- prompts


@pytest.fixture
def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def test_build_prompt_with_chat_template(chat_tokenizer):
    prompt = build_prompt(chat_tokenizer, " What is 2 + 3? ")
    assert prompt == f"<|user|>What is 2 + 3? {DEFAULT_SUFFIX}\n<|assistant|>"
    prompt = build_prompt(chat_tokenizer, "Q?", system_prompt="Be brief.", suffix=QERL_SUFFIX)
    assert prompt == f"<|system|>Be brief.\n<|user|>Q? {QERL_SUFFIX}\n<|assistant|>"
    assert "<answer> </answer>" in QERL_SUFFIX


def test_build_prompt_plain(chat_tokenizer):
    assert build_prompt(chat_tokenizer, "Q?", suffix=None, chat_template=False) == "Q?"
    chat_tokenizer.chat_template = None
    assert build_prompt(chat_tokenizer, "Q?", system_prompt="Sys") == f"Sys\n\nQ? {DEFAULT_SUFFIX}"
