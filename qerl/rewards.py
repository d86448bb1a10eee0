"""Verifiable math rewards for GRPO: answer extraction, equivalence checking, reward shaping.

Pipeline for one completion:

1. ``extract_answer`` pulls the final answer out of the completion: the last
   ``\\boxed{...}``/``\\fbox{...}``, else the last ``<answer>...</answer>``, else the text
   after the last ``####``, else the last number. The order is configurable.
2. ``normalize_gold`` reduces a gold label to its final answer (a GSM8K solution ending
   in ``#### 42`` becomes ``42``, a MATH solution becomes the content of its last box).
3. ``is_correct`` compares the two: an in-process fast path settles exact matches and
   plain numbers (every GSM8K answer), everything else goes to the math-verify library
   (LaTeX, radicals, tuples, intervals, sets, degrees, percentages, units, ``\\text{}``).

math-verify can hang (``9^{9^{9^{9^9}}}``) or recurse deeply on pathological input, and
its own timeouts use ``signal.alarm``, which works only in the main thread and cannot
interrupt long C-level big-integer arithmetic. So math-verify never runs in the caller's
process: it runs in small worker subprocesses (plain Python + math-verify, no torch) that
are killed when a verification exceeds its time bound. That gives a hard bound from any
thread; workers are started lazily (about a second, once, not counted in the bound) and
reused, so a verification costs one pipe round trip on top of math-verify itself. A batch
(``score_batch``, which ``compute_rewards`` uses) sends its comparisons to several workers at
once, so a batch of runaway completions costs about one time bound, not one per completion.
POSIX only (the reply is awaited with ``select`` on a pipe).

Rewards differ from the QeRL paper's: QeRL paid 2.0 for a correct answer inside
``<answer>`` tags (exact string match) plus 0.2 for the format. Here the components are
``correct`` (1/0, math-verify equivalence, answer taken from boxes, tags, ``####`` or the
last number), ``format`` (1/0, an answer tag or box is present) and ``overlong`` (DAPO's
soft length penalty), combined by the weights of ``RewardConfig``. The QeRL setting is
``RewardConfig(correct=2.0, format=0.2, answer_order=("answer_tag",))``.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

logger = logging.getLogger(__name__)

ANSWER_METHODS = ("boxed", "answer_tag", "hash", "last_number")
DEFAULT_ANSWER_ORDER = ANSWER_METHODS


class VerifierError(RuntimeError):
    """The math-verify worker process could not be started (an environment problem)."""


# --------------------------------------------------------------------------- extraction


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _box_spans(text: str) -> list[tuple[int, int]]:
    """``(macro_start, close_brace)`` of every complete ``\\boxed{...}``/``\\fbox{...}``, in order.

    One linear pass matches braces, so adversarial input (thousands of unclosed boxes)
    costs O(n). ``\\{`` and ``\\}`` are literal braces in LaTeX and do not nest.
    """
    closing: dict[int, int] = {}  # index of "{" -> index of its matching "}"
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character: \{ \} \\
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
        i += 1
    return [(m.start(), closing[m.end() - 1]) for m in _BOXED_RE.finditer(text) if m.end() - 1 in closing]


def _box_content(text: str, span: tuple[int, int]) -> str:
    return text[text.index("{", span[0]) + 1 : span[1]]


def _extract_boxed(text: str) -> str | None:
    # A completion truncated inside its final box still gets credit for an earlier
    # complete box; an unclosed box has no recoverable answer.
    spans = _box_spans(text)
    return _box_content(text, spans[-1]) if spans else None


def _extract_answer_tag(text: str) -> str | None:
    # rfind instead of a non-greedy regex: linear even with many unclosed tags.
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end]


def _extract_hash(text: str) -> str | None:
    idx = text.rfind("####")
    if idx < 0:
        return None
    rest = text[idx + 4 :].strip()
    # The GSM8K answer sits on the line of the marker; any chatter after it is not part of it.
    return rest.splitlines()[0] if rest else None


# A number not glued to a preceding word or decimal point; thousands separators,
# decimals, a sign (only when not a binary minus as in "5-3") and simple fractions 3/4.
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w.)])-|(?<![\w.]))(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def _extract_last_number(text: str) -> str | None:
    last = None
    for last in _LAST_NUMBER_RE.finditer(text):  # noqa: B007 (the loop keeps the last match)
        pass
    return last.group(0) if last else None


_EXTRACTORS = {
    "boxed": _extract_boxed,
    "answer_tag": _extract_answer_tag,
    "hash": _extract_hash,
    "last_number": _extract_last_number,
}


def _check_order(order: Sequence[str]) -> tuple[str, ...]:
    if isinstance(order, str) or not order:
        raise ValueError(f"answer order must be a non-empty sequence of {ANSWER_METHODS}, got {order!r}")
    unknown = [m for m in order if m not in _EXTRACTORS]
    if unknown:
        raise ValueError(f"unknown answer extraction method(s) {unknown}; choose from {ANSWER_METHODS}")
    return tuple(order)


def extract_answer(completion: str, order: Sequence[str] = DEFAULT_ANSWER_ORDER) -> str | None:
    """The final answer in ``completion`` (stripped), or None if no method in ``order`` finds one.

    Methods are tried in ``order``; the first that yields a non-empty answer wins. Within
    a method the *last* occurrence counts, since models restate the answer at the end.
    """
    order = _check_order(order)
    if not isinstance(completion, str):
        return None
    for method in order:
        answer = _EXTRACTORS[method](completion)
        if answer is not None and answer.strip():
            return answer.strip()
    return None


def normalize_gold(gold: str) -> str | None:
    """The final answer of a gold label: the text after ``####`` (GSM8K solution), the
    content of the last box (MATH solution), else the whole label. None if the label is
    empty or is a solution whose final answer cannot be found (``####`` with nothing
    after it, an unclosed box)."""
    if not isinstance(gold, str):
        return None
    if "####" in gold:
        answer = _extract_hash(gold)
    elif _BOXED_RE.search(gold):
        answer = _extract_boxed(gold)
    else:
        answer = gold
    answer = answer.strip() if answer is not None else ""
    return answer or None


# --------------------------------------------------------------------------- comparison


def _clean(answer: str) -> str:
    s = answer.strip().replace("\u2212", "-")  # unicode minus, common in model output
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
            break
    spans = _box_spans(s) if s.startswith(("\\boxed", "\\fbox")) else []
    # Unwrap only when one box is the whole answer ("\boxed{5}", not "\boxed{5}+1").
    if spans and spans[0] == (0, len(s) - 1):
        s = _box_content(s, spans[0]).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


_NUMBER_RE = re.compile(
    r"""
    (?:\\?\$\s*)?                                     # currency: $18 or \$18
    (?P<sign>[-+]?)\s*
    (?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)
    (?:\s*/\s*(?P<den>\d+))?                          # plain fraction: 3/4
    # unit words ("18 dollars", "5\text{ apples}"); 3+ letters so "2 x" or "3 pi" stay symbolic
    (?:\s*\\text\s*\{\s*[A-Za-z][A-Za-z ]*\}|\s+[A-Za-z]{3,}){0,3}
    """,
    re.VERBOSE,
)

# math-verify compares numbers involving a decimal after rounding to 6 places, so two
# plain numbers further apart than this can never match there; closer ones are left to it.
_NUMERIC_SLACK = Fraction(1, 10**6)


def _as_number(s: str) -> Fraction | None:
    m = _NUMBER_RE.fullmatch(s)
    if m is None:
        return None
    try:
        value = Fraction(m["num"].replace(",", ""))
        if m["den"]:
            value /= int(m["den"])
    except (ValueError, ZeroDivisionError):  # "3/0"; digit strings over Python's int limit
        return None
    return -value if m["sign"] == "-" else value


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """True/False when decidable without math-verify, else None."""
    if pred == gold:
        return True
    a, b = _as_number(pred), _as_number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return True
    return False if abs(a - b) > _NUMERIC_SLACK else None


@functools.lru_cache(maxsize=8192)  # GRPO groups repeat the same answers many times
def _equivalent(pred: str, gold: str, timeout: float) -> bool:
    verdict = _fast_verdict(pred, gold)
    if verdict is not None:
        return verdict
    return _verify_in_worker(gold, pred, timeout)


def _answer_pair(completion: str, gold: str, order: tuple[str, ...]) -> tuple[str, str] | None:
    """(prediction, gold answer), cleaned for comparison; None when either has no answer."""
    try:
        pred = extract_answer(completion, order)
        gold_answer = normalize_gold(gold)
        if pred is None or gold_answer is None:
            return None
        return _clean(pred), _clean(gold_answer)
    except Exception:  # RecursionError, MemoryError, anything odd: the answer does not count
        logger.debug("answer extraction failed; scored as wrong", exc_info=True)
        return None


def _judge(pair: tuple[str, str] | None, timeout: float) -> bool:
    if pair is None:
        return False
    try:
        return _equivalent(pair[0], pair[1], timeout)
    except VerifierError:
        raise
    except Exception:
        logger.debug("answer comparison failed; scored as wrong", exc_info=True)
        return False


def _check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return float(timeout)


def is_correct(
    completion: str,
    gold: str,
    *,
    order: Sequence[str] = DEFAULT_ANSWER_ORDER,
    timeout: float = 5.0,
) -> bool:
    """Whether the answer extracted from ``completion`` is equivalent to ``gold``.

    ``gold`` may be a bare answer (``42``, ``\\frac{\\pi}{2}``) or a whole GSM8K/MATH
    solution. Never raises on string input: unparsable, pathological or timed-out
    comparisons are False. ``timeout`` (seconds) bounds the math-verify step from any
    thread; killing a runaway worker adds a few milliseconds.
    """
    return _judge(_answer_pair(completion, gold, _check_order(order)), _check_timeout(timeout))


# Concurrent math-verify workers of one batch: two per CPU core, so that beside runaway comparisons an
# ordinary one still gets half a core of CPU time within its bound (a runaway one is killed at its deadline
# however busy the cores are). Each is a process of ~0.1 GB taking ~1 s of CPU to start, once: idle
# workers are reused.
VERIFY_WORKERS = min(32, 2 * (os.cpu_count() or 1))


def score_batch(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    order: Sequence[str] = DEFAULT_ANSWER_ORDER,
    timeout: float = 5.0,
    workers: int | None = None,
) -> list[bool]:
    """``is_correct`` of each (completion, gold) pair, the comparisons that need math-verify in parallel.

    Plain numbers and exact matches are settled in this process; each distinct remaining comparison
    goes to its own worker process, up to ``workers`` (default ``VERIFY_WORKERS``) at once, each under
    its own time bound. A batch of ``k`` pathological completions then costs about
    ``timeout * ceil(k / workers)`` (one time bound when ``k <= workers``), not ``timeout * k``.
    """
    order, timeout = _check_order(order), _check_timeout(timeout)
    if len(completions) != len(golds):
        raise ValueError(f"length mismatch: {len(completions)} completions, {len(golds)} golds")
    pairs = [_answer_pair(c, g, order) for c, g in zip(completions, golds)]
    distinct = list(dict.fromkeys(p for p in pairs if p is not None))
    fast = {p: _fast_verdict(*p) for p in distinct}
    verdicts = {p: v for p, v in fast.items() if v is not None}
    slow = [p for p, v in fast.items() if v is None]
    n = min(len(slow), workers or VERIFY_WORKERS)
    if n > 1:
        with ThreadPoolExecutor(n, thread_name_prefix="qerl-verify") as pool:
            verdicts.update(zip(slow, pool.map(lambda p: _judge(p, timeout), slow)))
    else:
        verdicts.update((p, _judge(p, timeout)) for p in slow)
    return [p is not None and verdicts[p] for p in pairs]


# --------------------------------------------------------------------------- verifier workers

_STARTUP_TIMEOUT_S = 120.0
# Address-space cap for a worker: sympy needs a few hundred MB; a runaway 10^(10^10)
# should hit MemoryError there rather than take the training machine's RAM.
_WORKER_MEMORY_BYTES = 4 << 30

# Loads this file by path so the worker does not import the qerl package (and torch).
_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('qerl_verify_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._serve()\n"
)


def _parse_for_verify(parse, answer: str) -> list:
    # Inside \boxed{} math-verify reads the whole string as one LaTeX expression, so
    # "3\sqrt{13}" is not cut down to its leading 3 and "(3, \frac{\pi}{2})" stays a
    # tuple. Prose that yields nothing that way ("the answer is 42") gets the plain parse.
    return parse("\\boxed{" + answer + "}", parsing_timeout=None) or parse(answer, parsing_timeout=None)


def _cap_rlimit(resource, which: int, value: int) -> None:
    """Lower the soft limit to ``value`` (never above the hard limit, which we cannot raise)."""
    hard = resource.getrlimit(which)[1]
    resource.setrlimit(which, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


def _serve() -> None:
    """Main loop of a verifier worker: one JSON request per stdin line, "1"/"0" replies."""
    import resource

    out = sys.stdout.buffer
    try:
        _cap_rlimit(resource, resource.RLIMIT_AS, _WORKER_MEMORY_BYTES)
        from math_verify import parse, verify
    except Exception as e:  # reported to the parent, which raises VerifierError
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        out.flush()
        return
    # Timeouts are disabled on purpose (the parent kills us), so math-verify's warning
    # about that, and its per-input debug chatter, are noise.
    logging.disable(logging.CRITICAL)
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            gold, pred, timeout = json.loads(line)
            # CPU-time cap a little beyond the parent's deadline: if the parent died
            # without killing us, SIGXCPU still ends a runaway computation.
            used = resource.getrusage(resource.RUSAGE_SELF)
            _cap_rlimit(resource, resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + timeout) + 2)
            ok = bool(verify(_parse_for_verify(parse, gold), _parse_for_verify(parse, pred), timeout_seconds=None))
        except Exception:
            ok = False
        out.write(b"1\n" if ok else b"0\n")
        out.flush()


class _Worker:
    """One verifier subprocess, used by one thread at a time."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            start_new_session=True,  # a Ctrl-C meant for the trainer does not hit the worker
        )
        self._buf = b""
        line = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        if line != b"ready":
            self.kill()
            try:
                detail = json.loads(line)["error"] if line else "no reply"
            except (ValueError, KeyError, TypeError):
                detail = repr(line[:200])
            raise VerifierError(f"math-verify worker failed to start ({sys.executable}): {detail}")

    def alive(self) -> bool:
        return self._proc.poll() is None

    def ask(self, gold: str, pred: str, timeout: float) -> bool | None:
        """The worker's verdict, or None if it missed the deadline or died."""
        deadline = time.monotonic() + timeout
        try:
            self._proc.stdin.write(json.dumps([gold, pred, timeout]).encode() + b"\n")
        except OSError:
            return None
        line = self._read_line(deadline)
        return None if line is None else line == b"1"

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # EOF: crashed, or killed by its memory/CPU limit
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._proc.stdin.close()
        self._proc.stdout.close()


_pool_lock = threading.Lock()
_idle_workers: list[_Worker] = []


def _forget_workers_after_fork() -> None:
    # A forked child shares the parent's pipes; talking to the parent's workers would
    # interleave replies. The child starts its own on demand.
    global _pool_lock
    _pool_lock = threading.Lock()
    _idle_workers.clear()


def _shutdown_workers() -> None:
    with _pool_lock:
        while _idle_workers:
            _idle_workers.pop().kill()


os.register_at_fork(after_in_child=_forget_workers_after_fork)
atexit.register(_shutdown_workers)


def _verify_in_worker(gold: str, pred: str, timeout: float) -> bool:
    worker = None
    with _pool_lock:
        while _idle_workers and worker is None:
            candidate = _idle_workers.pop()
            if candidate.alive():
                worker = candidate
            else:
                candidate.kill()
    if worker is None:
        # Concurrent callers each get their own worker, so one caller's slow
        # verification never eats into another's time bound.
        worker = _Worker()
    verdict = worker.ask(gold, pred, timeout)
    if verdict is None:
        worker.kill()
        # Start the replacement now, off the caller's clock, so the next verification
        # does not pay the worker's startup inside its own time bound.
        threading.Thread(target=_start_spare_worker, daemon=True).start()
        logger.warning(
            "math-verify exceeded %.1fs or crashed; scored as wrong (pred=%.80r, gold=%.80r)", timeout, pred, gold
        )
        return False
    with _pool_lock:
        _idle_workers.append(worker)
    return verdict


def start_verifiers(n: int) -> None:
    """Start math-verify workers, in parallel, until ``n`` are idle: a batch scored next pays no startup."""
    with _pool_lock:
        missing = n - len(_idle_workers)
    threads = [threading.Thread(target=_start_spare_worker, daemon=True) for _ in range(max(missing, 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _start_spare_worker() -> None:
    try:
        worker = _Worker()
    except VerifierError as e:  # the next caller retries and raises it
        logger.debug("could not start a spare verifier worker: %s", e)
        return
    with _pool_lock:
        _idle_workers.append(worker)


# --------------------------------------------------------------------------- rewards


def correctness_reward(
    completion: str, gold: str, *, order: Sequence[str] = DEFAULT_ANSWER_ORDER, timeout: float = 5.0
) -> float:
    """1.0 if the completion's answer is equivalent to ``gold``, else 0.0."""
    return 1.0 if is_correct(completion, gold, order=order, timeout=timeout) else 0.0


def format_reward(completion: str) -> float:
    """1.0 if the completion states its answer in ``<answer>...</answer>`` or a box, else 0.0."""
    return 1.0 if extract_answer(completion, ("answer_tag", "boxed")) is not None else 0.0


def overlong_penalty(length: int, max_len: int, buffer_len: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_len - buffer_len`` tokens, then a
    linear ramp to ``-penalty`` at ``max_len`` (a truncated completion), ``-penalty`` beyond.
    With ``buffer_len == 0`` only a completion reaching ``max_len`` is punished."""
    if max_len <= 0 or buffer_len < 0:
        raise ValueError(f"need max_len > 0 and buffer_len >= 0, got {max_len=}, {buffer_len=}")
    if length >= max_len:
        return -float(penalty)
    if buffer_len == 0:
        return 0.0
    excess = length - (max_len - buffer_len)
    return -float(penalty) * excess / buffer_len if excess > 0 else 0.0


@dataclass
class RewardConfig:
    """Weights of the reward components; the total is their weighted sum.

    ``overlong_buffer`` is DAPO's L_cache in tokens (DAPO used 4096 of 20480, 20%).
    ``answer_order`` is the extraction order passed to ``extract_answer``.
    """

    correct: float = 1.0
    format: float = 0.0
    overlong: float = 0.0
    overlong_buffer: int = 128
    answer_order: tuple[str, ...] = DEFAULT_ANSWER_ORDER
    verify_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.answer_order = _check_order(self.answer_order)  # also turns a YAML list into a tuple
        if self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if not self.verify_timeout > 0:
            raise ValueError(f"verify_timeout must be positive, got {self.verify_timeout}")


def compute_rewards(
    completions: list[str],
    golds: list[str],
    lengths: list[int],
    max_len: int,
    cfg: RewardConfig | None = None,
    workers: int | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Total reward per completion and each component (``correct``, ``format``,
    ``overlong``, unweighted) so accuracy can be logged apart from the reward.
    ``lengths`` are completion lengths in tokens; ``max_len`` the generation limit.
    Correctness is scored by ``score_batch`` (math-verify comparisons in parallel, up to ``workers``)."""
    cfg = cfg or RewardConfig()
    if not len(completions) == len(golds) == len(lengths):
        raise ValueError(f"length mismatch: {len(completions)} completions, {len(golds)} golds, {len(lengths)} lengths")
    ok = score_batch(completions, golds, order=cfg.answer_order, timeout=cfg.verify_timeout, workers=workers)
    correct = [1.0 if c else 0.0 for c in ok]
    fmt = [format_reward(c) for c in completions]
    overlong = [overlong_penalty(n, max_len, cfg.overlong_buffer) for n in lengths]
    totals = [cfg.correct * c + cfg.format * f + cfg.overlong * o for c, f, o in zip(correct, fmt, overlong)]
    return totals, {"correct": correct, "format": fmt, "overlong": overlong}
