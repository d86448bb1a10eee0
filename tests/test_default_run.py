"""The embedded default (`qerl train`) for a few small steps, end to end, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qerl.config import DEFAULT_OVERRIDES, load_config


def test_default_config_is_the_documented_one():
    """configs/default.yaml writes out exactly what `qerl train` runs with no arguments."""
    shipped = Path(__file__).resolve().parents[1] / "configs/default.yaml"
    assert DEFAULT_OVERRIDES
    assert load_config(shipped).to_dict() == load_config(None).to_dict()


@pytest.mark.slow
def test_qerl_train_default_runs_a_few_steps(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "qerl.cli",
        "train",
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
        "--rollout.prompts_per_step",
        "2",
        "--rollout.group_size",
        "4",
        "--rollout.max_new_tokens",
        "12",
        "--train.eval_limit",
        "4",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "reward_mean" in x]
    assert [x["step"] for x in steps] == [1, 2]
    for k in (
        "reward_mean",
        "accuracy",
        "entropy",
        "sigma",
        "mismatch_kl",
        "tokens_per_s",
        "step_s",
        "peak_mem_gb",
        "completion_len",
        "clip_frac",
    ):
        assert k in steps[-1] or (k == "clip_frac" and steps[-1].get("active_seqs") == 0), k
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    for f in ("curves.png", "summary.md", "adapter/adapter_model.safetensors", "checkpoints/latest"):
        assert (out / f).exists(), f
    assert "held-out accuracy" in r.stdout


def test_default_uses_length_unbiased_aggregation_unless_another_algorithm_is_picked():
    """The embedded default sums each completion's tokens over a constant (no per-completion 1/length);
    `--algo.name dapo` on top of it gets DAPO's own settings, and an explicit aggregation still wins."""
    assert load_config(None).algo.resolved().aggregation == "constant"
    assert load_config(None).algo.resolved().name == "grpo"
    dapo = load_config(None, ["--algo.name", "dapo"]).algo.resolved()
    assert (dapo.aggregation, dapo.eps_high) == ("token_mean", 0.28)
    both = load_config(None, ["--algo.name", "dapo", "--algo.aggregation", "seq_mean"]).algo.resolved()
    assert both.aggregation == "seq_mean"
    assert load_config(None, ["--algo.aggregation", "token_mean"]).algo.resolved().aggregation == "token_mean"
