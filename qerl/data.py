"""Question/answer records for RL on verifiable math: loading, validation, prompts.

Sources accepted by ``load_records``:

* a local ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``) or
  ``.parquet`` file, or a directory holding ``{split}.jsonl|.json|.parquet``;
* a Hugging Face Hub dataset name such as ``openai/gsm8k`` or ``HuggingFaceH4/MATH-500``
  (``name:config`` picks a config), through the optional ``datasets`` package (``pip install 'qerl[hub]'``);
* ``arithmetic`` / ``arithmetic:<difficulty>``: word problems generated here from a
  seed, so the smallest end-to-end run needs no download.

Gold answers are normalized once, at load time, with ``qerl.rewards.normalize_gold``: a
GSM8K solution becomes the text after ``####``, a MATH solution the content of its last
``\\boxed{}``. Malformed rows are never used: they are skipped, counted by reason in a
``LoadReport`` and reported in one line (``LoadReport.summary()`` and a log warning).
"""

from __future__ import annotations

import json
import logging
import numbers
import random
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rewards import normalize_gold

logger = logging.getLogger(__name__)

QUESTION_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("answer", "solution", "final_answer")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# QeRL-style instruction: reasoning in <think>, final answer in <answer> tags.
QERL_SUFFIX = (
    "Solve the problem step by step. Write your reasoning inside <think> </think> tags, "
    "then write only the final answer inside <answer> </answer> tags."
)
# Tiny models (SmolLM2-135M) follow a short plain request better than a tag format;
# the answer is then read from the last number of the completion.
DEFAULT_SUFFIX = "Give the final answer as a number at the end."

# Configs that hub datasets require but that users rarely remember.
_HUB_DEFAULT_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}
_HUB_NAME_RE = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?(?::[\w.-]+)?")
_EXAMPLES_PER_REASON = 3


class DataError(ValueError):
    """A data source cannot be used; the message is one line and names the source."""


@dataclass
class Record:
    question: str
    answer: str  # the normalized gold final answer
    meta: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    """What happened to the rows of one source: kept, and skipped by reason."""

    source: str
    split: str
    unit: str = "row"  # "line" for JSONL, where positions are file line numbers
    rows: int = 0  # rows read, kept or skipped
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)  # first positions per reason
    limit: int | None = None  # reading stopped once this many records were kept

    def skip(self, reason: str, position: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        positions = self.examples.setdefault(reason, [])
        if len(positions) < _EXAMPLES_PER_REASON:
            positions.append(position)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        line = f"{self.source} [{self.split}]: kept {self.kept} of {self.rows} {self.unit}s"
        if self.limit is not None and self.kept >= self.limit:
            line += f" (stopped at limit={self.limit})"
        if self.skipped:
            parts = []
            for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                where = ", ".join(map(str, self.examples[reason]))
                more = ", ..." if count > len(self.examples[reason]) else ""
                unit = self.unit if len(self.examples[reason]) == 1 else self.unit + "s"
                parts.append(f"{reason} x{count} ({unit} {where}{more})")
            line += f"; skipped {self.n_skipped}: " + "; ".join(parts)
        return line


# --------------------------------------------------------------------------- loading


def load_records(
    source: str,
    split: str = "train",
    *,
    question_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[list[Record], LoadReport]:
    """Load and validate records from ``source`` (see the module docstring).

    ``question_key``/``answer_key`` override the column lookup (default: the first of
    ``QUESTION_KEYS``/``ANSWER_KEYS`` present in a row). ``limit`` keeps the first
    ``limit`` valid records in source order (or sets the size of a generated split).
    ``seed`` only drives the generated ``arithmetic`` task; files keep their order.
    Raises ``DataError`` when the source is missing, unreadable or has no valid row.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    path = Path(source).expanduser()
    task, _, arg = source.partition(":")
    if task == "arithmetic" and not path.exists():
        return _load_arithmetic(source, arg, split, limit, seed)

    if path.is_dir():
        path = _split_file(path, split)
    if path.is_file():
        report = LoadReport(str(path), split, unit="line" if path.suffix == ".jsonl" else "row", limit=limit)
        rows = _read_file(path, report)
    elif path.suffix in FILE_SUFFIXES or not _HUB_NAME_RE.fullmatch(source):
        raise DataError(f"data file not found: {path}")
    else:
        report = LoadReport(source, split, limit=limit)
        rows = _read_hub(source, split)

    records = _validate(rows, report, question_key, answer_key, limit, {"source": report.source, "split": split})
    if report.n_skipped:
        logger.warning("%s", report.summary())
    if not records and limit != 0:
        raise DataError(f"no valid rows in {report.source}: {report.summary()}")
    return records, report


def _split_file(directory: Path, split: str) -> Path:
    for suffix in FILE_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    names = ", ".join(f"{split}{s}" for s in FILE_SUFFIXES)
    raise DataError(f"no {names} in directory {directory}")


def _read_file(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """(position, row) pairs; rows that are not even JSON are counted here."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path, report)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"unsupported data file type {path.suffix!r} (use .jsonl, .json or .parquet): {path}")


def _read_jsonl(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:  # bytes: json.loads detects the encoding, including a BOM
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are layout, not rows
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                report.rows += 1
                report.skip("invalid JSON", lineno)
                continue
            yield lineno, row


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except ValueError as e:
        raise DataError(f"invalid JSON in {path}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'expected a list of objects or {{"data": [...]}} in {path}, got {type(data).__name__}')
    return enumerate(data, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors are many types; the message says what broke
        raise DataError(f"could not read parquet file {path}: {_one_line(e)}") from None
    return enumerate(rows, start=1)


def _read_hub(source: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets  # optional and heavy: imported only for hub sources
    except ImportError:
        raise DataError(
            f"{source!r} is not a local file or directory, and loading it from the Hugging Face Hub "
            "needs the datasets package, in qerl's hub extra: pip install 'qerl[hub]' (or pip install datasets)"
        ) from None
    name, _, config = source.partition(":")
    config = config or _HUB_DEFAULT_CONFIGS.get(name)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all end the same way
        raise DataError(f"could not load hub dataset {source!r} split {split!r}: {_one_line(e)}") from None
    return enumerate((dict(row) for row in ds), start=1)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _pick_key(row: dict, key: str | None, candidates: tuple[str, ...]) -> str | None:
    if key is not None:
        return key if key in row else None
    return next((k for k in candidates if k in row), None)


def _validate(
    rows: Iterable[tuple[int, Any]],
    report: LoadReport,
    question_key: str | None,
    answer_key: str | None,
    limit: int | None,
    meta_base: dict,
) -> list[Record]:
    records: list[Record] = []
    for position, row in rows:
        if limit is not None and len(records) >= limit:
            break
        report.rows += 1
        record, reason = _to_record(row, question_key, answer_key)
        if record is None:
            report.skip(reason, position)
            continue
        # The row's other columns, then ours: on a clash (a "source" column) ours win.
        record.meta = {**record.meta, **meta_base, report.unit: position}
        records.append(record)
    report.kept = len(records)
    return records


def _to_record(row: Any, question_key: str | None, answer_key: str | None) -> tuple[Record | None, str]:
    """The record for one row, or None and the reason it cannot be used."""
    if not isinstance(row, dict):
        return None, "not an object"
    qkey = _pick_key(row, question_key, QUESTION_KEYS)
    akey = _pick_key(row, answer_key, ANSWER_KEYS)
    if qkey is None:
        return None, "missing question"
    if akey is None:
        return None, "missing answer"
    question, raw = row[qkey], row[akey]
    if question is None or (isinstance(question, str) and not question.strip()):
        return None, "empty question"
    if not isinstance(question, str):
        return None, "non-string question"
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        raw = str(raw)  # numeric final_answer columns are fine as their decimal text
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None, "empty answer"
    if not isinstance(raw, str):
        return None, "non-string answer"
    answer = normalize_gold(raw)
    if answer is None:
        return None, "no final answer in solution"
    meta = {k: v for k, v in row.items() if k not in (qkey, akey)}
    if answer != raw.strip():
        meta["raw_answer"] = raw
    return Record(question.strip(), answer, meta), ""


# --------------------------------------------------------------------------- prompts


def build_prompt(
    tokenizer: Any,
    question: str,
    *,
    system_prompt: str | None = None,
    suffix: str | None = DEFAULT_SUFFIX,
    chat_template: bool = True,
) -> str:
    """The generation prompt for ``question``: the tokenizer's chat template (with the
    assistant turn opened) when it has one and ``chat_template`` is set, else plain text.
    ``suffix`` (an instruction such as ``QERL_SUFFIX``) follows the question."""
    content = question.strip() if not suffix else f"{question.strip()} {suffix.strip()}"
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt.strip()}\n\n{content}" if system_prompt else content


# --------------------------------------------------------------------------- arithmetic task

ARITHMETIC_SPLIT_SIZES = {"train": 2000, "test": 200}
ARITHMETIC_DIFFICULTIES = (1, 2, 3, 4)
# One question in this many belongs to the test split (by hash of its text), so train
# and test are disjoint whatever their sizes or seeds.
_TEST_BUCKETS = 10

_NAMES = (
    ("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"), ("Mia", "she"),
    ("Max", "he"), ("Emma", "she"), ("Leo", "he"), ("Sara", "she"), ("Jack", "he"), ("Lucy", "she"),
    ("Omar", "he"), ("Nina", "she"), ("Ravi", "he"), ("Zoe", "she"),
)  # fmt: skip
_OBJECTS = (
    ("apple", "apples"), ("pencil", "pencils"), ("ball", "balls"), ("book", "books"),
    ("cookie", "cookies"), ("marble", "marbles"), ("sticker", "stickers"), ("flower", "flowers"),
    ("toy car", "toy cars"), ("card", "cards"), ("egg", "eggs"), ("orange", "oranges"),
    ("shell", "shells"), ("coin", "coins"), ("candy", "candies"), ("stamp", "stamps"),
)  # fmt: skip
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"))

# {S}/{O}: subject/object pronoun of the main character, {F}: a friend, {k}: "5 apples",
# {more}: "5 more apples", {N}: the main character, {c}: a container.
_GAIN = ("{S} buys {more}.", "{S} finds {more}.", "{S} gets {more} from {F}.", "{F} gives {O} {more}.")
_LOSE = ("{S} gives {k} to {F}.", "{S} loses {k}.", "{S} sells {k}.")
_PUT = ("{N} puts {more} into the {c}.", "{N} adds {more} to the {c}.")
_TAKE = ("{N} takes {k} out of the {c}.", "{N} removes {k} from the {c}.")


def _qty(n: int, obj: tuple[str, str], more: bool = False) -> str:
    return f"{n} {'more ' if more else ''}{obj[0] if n == 1 else obj[1]}"


def _chain_problem(rng: random.Random, operands: list[int], ops: list[str]) -> str:
    """A story where a count starts at operands[0] and changes by each later operand."""
    name, pron = rng.choice(_NAMES)
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    obj = rng.choice(_OBJECTS)
    words = {"N": name, "S": pron.capitalize(), "O": "him" if pron == "he" else "her", "F": friend}
    if len(operands) == 2 and ops == ["+"] and rng.random() < 0.25:
        a, b = operands
        return f"{name} has {_qty(a, obj)}. {friend} has {_qty(b, obj)}. How many {obj[1]} do they have together?"
    in_container = rng.random() < 0.35
    if in_container:
        words["c"] = container = rng.choice(_CONTAINERS)[0]
        first = operands[0]
        sentences = [f"There {'is' if first == 1 else 'are'} {_qty(first, obj)} in the {container}."]
        gain, lose = _PUT, _TAKE
        question = f"How many {obj[1]} are in the {container} now?"
    else:
        sentences = [f"{name} has {_qty(operands[0], obj)}."]
        gain, lose = _GAIN, _LOSE
        question = f"How many {obj[1]} does {name} have now?"
    for op, n in zip(ops, operands[1:]):
        template = rng.choice(gain if op == "+" else lose)
        sentences.append(template.format(**words, k=_qty(n, obj), more=_qty(n, obj, more=True)))
    return " ".join(sentences + [question])


def _multiplication_problem(rng: random.Random) -> tuple[str, str, int]:
    name, pron = rng.choice(_NAMES)
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    obj = rng.choice(_OBJECTS)
    box, boxes = rng.choice(_CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    words = {"S": pron.capitalize(), "O": "him" if pron == "he" else "her", "F": friend}
    form = rng.choice(("a*b", "a*b+c", "a*b-c", "c+a*b"))
    if form == "a*b-c" and c > a * b:
        form = "a*b+c"  # counts never go negative
    if form == "c+a*b":
        text = f"{name} has {_qty(c, obj)}. {words['S']} buys {a} {boxes} with {_qty(b, obj)} in each {box}."
        expression, value = f"{c} + {a} * {b}", c + a * b
    else:
        text = f"{name} has {a} {boxes}. Each {box} has {_qty(b, obj)} in it."
        expression, value = f"{a} * {b}", a * b
        if form != "a*b":
            gain = form == "a*b+c"
            template = rng.choice(_GAIN if gain else _LOSE)
            text += " " + template.format(**words, k=_qty(c, obj), more=_qty(c, obj, more=True))
            expression += f" {'+' if gain else '-'} {c}"
            value += c if gain else -c
    return f"{text} How many {obj[1]} does {name} have now?", expression, value


def _arithmetic_problem(rng: random.Random, difficulty: int) -> tuple[str, str, int]:
    """(question, expression over the question's numbers in order of appearance, value)."""
    if difficulty == 4:
        return _multiplication_problem(rng)
    if difficulty == 1:
        operands, ops = [rng.randint(1, 9), rng.randint(1, 9)], ["+"]
    elif difficulty == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        ops = [rng.choice("+-")]
        operands = [max(a, b), min(a, b)] if ops == ["-"] else [a, b]
    else:
        operands, ops = [rng.randint(5, 30)], []
        for _ in range(2):
            running = operands[0] + sum(n if op == "+" else -n for op, n in zip(ops, operands[1:]))
            n, op = rng.randint(1, 20), rng.choice("+-")
            ops.append("+" if op == "-" and n > running else op)  # counts never go negative
            operands.append(n)
    value = operands[0] + sum(n if op == "+" else -n for op, n in zip(ops, operands[1:]))
    expression = " ".join([str(operands[0])] + [f"{op} {n}" for op, n in zip(ops, operands[1:])])
    return _chain_problem(rng, operands, ops), expression, value


def _is_test_question(question: str) -> bool:
    return zlib.crc32(question.encode()) % _TEST_BUCKETS == 0


def arithmetic_records(n: int, seed: int, difficulty: int = 1, *, split: str | None = None) -> list[Record]:
    """``n`` distinct arithmetic word problems, deterministic in (``seed``, ``difficulty``, ``split``).

    difficulty 1: single-digit addition of two numbers; 2: two-digit addition or
    subtraction (non-negative results); 3: three numbers with + and -; 4: multiplication
    mixed in. With ``split`` ("train"/"test") each split draws from its own seed stream and
    keeps only questions of its hash bucket, so the two never share a question.
    """
    if difficulty not in ARITHMETIC_DIFFICULTIES:
        raise DataError(f"arithmetic difficulty must be one of {ARITHMETIC_DIFFICULTIES}, got {difficulty!r}")
    if split not in (None, *ARITHMETIC_SPLIT_SIZES):
        raise DataError(f"arithmetic splits are {tuple(ARITHMETIC_SPLIT_SIZES)}, got {split!r}")
    rng = random.Random(f"qerl-arithmetic/{difficulty}/{split or 'any'}/{seed}")
    records: list[Record] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * n + 1000
    while len(records) < n:
        if attempts == max_attempts:
            raise DataError(f"could only generate {len(records)} distinct arithmetic problems of the {n} asked for")
        attempts += 1
        question, expression, value = _arithmetic_problem(rng, difficulty)
        if question in seen or (split is not None and _is_test_question(question) != (split == "test")):
            continue
        seen.add(question)
        meta = {"source": "arithmetic", "difficulty": difficulty, "expression": expression, "seed": seed}
        records.append(Record(question, str(value), meta))
    return records


def _load_arithmetic(
    source: str, arg: str, split: str, limit: int | None, seed: int
) -> tuple[list[Record], LoadReport]:
    if arg and not arg.isdigit():
        raise DataError(f"expected arithmetic:<difficulty>, difficulty in {ARITHMETIC_DIFFICULTIES}; got {source!r}")
    if split not in ARITHMETIC_SPLIT_SIZES:
        raise DataError(f"arithmetic splits are {tuple(ARITHMETIC_SPLIT_SIZES)}, got {split!r}")
    n = ARITHMETIC_SPLIT_SIZES[split] if limit is None else limit
    records = arithmetic_records(n, seed, int(arg) if arg else 1, split=split)
    for i, record in enumerate(records):
        record.meta.update(split=split, index=i)
    report = LoadReport(source, split, rows=len(records), kept=len(records))
    return records, report
