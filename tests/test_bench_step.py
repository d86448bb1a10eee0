"""`qerl bench step` on a tiny random model (the Trainer's own step), forced ragged lengths,
and the automatic checkpointing rule."""

import json
import random

import pytest
import torch
from conftest import make_tiny_checkpoint

from qerl.bench_step import ForcedLengths, parse_lengths, run_step_bench
from qerl.config import load_config
from qerl.errors import QerlError
from qerl.modeling import ModelArgs, activation_bytes, auto_checkpoint_layers


def test_bench_step_runs_the_trainer_step(tmp_path, monkeypatch):
    import qerl.trainer as tr

    calls = []
    real = tr.Trainer.step
    monkeypatch.setattr(tr.Trainer, "step", lambda self, s: calls.append(s) or real(self, s))
    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=0, std=0.05)
    out = tmp_path / "step.json"
    rows = run_step_bench(
        str(path),
        ("nvfp4", "bf16"),
        prompts=2,
        group_size=4,
        prompt_len=8,
        gen_len=16,
        lengths="uniform:3-9",
        steps=2,
        out=str(out),
        update_paths=("packed", "reference"),
    )
    assert calls == [0, 1, 2] * 4  # a warm-up and two measured steps per (format, path), through Trainer.step
    assert [(r["quant"], r["update_path"]) for r in rows] == [
        ("nvfp4", "packed"),
        ("nvfp4", "reference"),
        ("bf16", "packed"),
        ("bf16", "reference"),
    ]
    for r in rows:
        assert 3 * 8 <= r["generated_tokens"] <= 9 * 8  # every completion ended at its forced length
        assert r["update_s"] > 0 and r["step_s"] >= r["rollout_s"] + r["update_s"]
        assert r["update_flops"] > 0 and r["plan_gib"] > 0
    data = json.loads(out.read_text())
    assert data["lengths"] == "uniform:3-9" and len(data["rows"]) == 4
    # same seeds, same lengths: both update paths train on the same completions
    assert rows[0]["generated_tokens"] == rows[1]["generated_tokens"]
    assert all(r["skipped_updates"] == 0 and r["measured_steps"] == 2 for r in rows)


def test_bench_step_flags_skipped_updates(tmp_path, monkeypatch, capsys):
    """A non-finite loss makes the update skip (adapter unchanged): the benchmark says so on its line, in its
    table and in a warning, and gives no ratio to bf16 (the time measured is no update's)."""
    import math

    import qerl.update as upd

    real = upd.policy_loss
    monkeypatch.setattr(upd, "policy_loss", lambda *a, **k: (lambda lm: (lm[0] * math.nan, lm[1]))(real(*a, **k)))
    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=0, std=0.05)
    with pytest.warns(UserWarning, match="non-finite"):
        rows = run_step_bench(
            str(path), ("nvfp4", "bf16"), prompts=2, group_size=4, prompt_len=8, gen_len=8, lengths="full", steps=1
        )
    assert [r["skipped_updates"] for r in rows] == [1, 1]
    assert all(math.isnan(r["step_vs_bf16"]) for r in rows)
    out = capsys.readouterr().out
    assert "UPDATE SKIPPED in 1 of 1 measured steps" in out and "| update skipped |" in out and "warning: nvfp4" in out


def test_lengths_specs():
    rng = random.Random(0)
    assert parse_lengths("full", 50)(3, rng) == [50, 50, 50]
    u = parse_lengths("uniform:10-20", 15)(200, rng)
    assert min(u) >= 10 and max(u) == 15  # capped at gen_len
    ln = parse_lengths("lognormal:600", 2048)(4000, rng)
    assert 1 <= min(ln) and max(ln) <= 2048 and 520 < sum(ln) / len(ln) < 640
    for bad in ("uniform:9-3", "lognormal:-1", "poisson:3", "full:2"):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad, 10)


def test_reference_engine_stops_rows_at_their_limits(tmp_path):
    from qerl.loading import load_model
    from qerl.rollout import Engine, SamplingParams

    path = make_tiny_checkpoint(tmp_path / "llama", "llama", seed=1, std=0.05)
    model, tok = load_model(path, quant="nvfp4", lora_rank=4, device="cpu")
    eng = Engine(model, tok)
    eng.eos_ids = [10**6]  # never sampled
    forced = ForcedLengths(eng, lambda n, rng: [3, 9, 1, 12][:n])
    out = forced.generate([[5, 6, 7], [8, 9]], SamplingParams(n=2, max_new_tokens=12, seed=0))
    assert out.lengths == [3, 9, 1, 12] and out.finish_reasons == ["length"] * 4
    assert bool((out.completion_ids[0, 3:] == eng.pad_id).all())
    with pytest.raises(ValueError, match="row_max_tokens"):
        eng.generate([[5]], SamplingParams(max_new_tokens=4, row_max_tokens=(5,)))


def test_auto_checkpointing_hand_case():
    a = ModelArgs(
        "qwen2",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_layers=10,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    full, kept = activation_bytes(a)
    assert full == 2 * (4 * 64 + 2 * 64 + 3 * 32 + 3 * 128) and kept == 2 * 64
    reserve = 2 * 2**30 + 12 * 1024 * 1000
    t = 1000
    base = reserve + 2 * t * full + t * kept * 10  # everything checkpointed, and one layer's transient
    assert auto_checkpoint_layers(a, t, base - 1) == 10
    assert auto_checkpoint_layers(a, t, base + 3 * t * (full - kept)) == 7  # room for 3 full layers
    assert auto_checkpoint_layers(a, t, float("inf")) == 0


def test_gradient_checkpointing_setting():
    for v, want in (("auto", "auto"), (True, "on"), ("false", "off"), ("on", "on")):
        assert load_config(None, {"model": {"gradient_checkpointing": v}}).model.gradient_checkpointing == want
    with pytest.raises(QerlError, match="model.gradient_checkpointing"):
        load_config(None, {"model": {"gradient_checkpointing": "sometimes"}})


def test_packed_and_reference_update_give_the_same_adapter(tmp_path):
    """One Trainer step each way from the same state: the same LoRA weights after the optimizer step."""
    from qerl.trainer import Trainer

    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=4, std=0.05)

    def reward(texts, golds, lengths, max_len, cfg=None):
        r = [float(i % 3 == 0) for i in range(len(texts))]
        return r, {"correct": r}

    after = {}
    for p in ("packed", "reference"):
        cfg = load_config(
            None,
            {
                "model": {"name": str(path), "lora_rank": 4, "device": "cpu", "dtype": "float32"},
                "rollout": {"prompts_per_step": 2, "group_size": 3, "max_new_tokens": 8},
                "optim": {"micro_batch_size": 3},
                "train": {"output_dir": str(tmp_path / p), "max_steps": 4},
            },
        )
        t = Trainer(cfg, progress=False, reward_fn=reward)
        t.update_path = p
        t.step(0)
        after[p] = [x.detach().clone() for x in t.params]
    for a, b in zip(after["packed"], after["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bench_step_under_torchrun_trains_data_parallel(tmp_path):
    """`torchrun -m qerl bench step` on 2 CPU ranks (gloo): the trainer's data-parallel step, the whole step's
    tokens counted, the gradients' all-reduce timed, every rank's peak reported, rank 0 alone printing."""
    import os
    import subprocess
    import sys

    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=0, std=0.05)
    out = tmp_path / "dp.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qerl"]
    r = subprocess.run(
        [*cmd, "bench", "step", "--model-config", str(path), "--quant", "nvfp4", "--prompts", "2",
         "--group-size", "4", "--prompt-len", "8", "--gen-len", "16", "--lengths", "uniform:3-9", "--steps", "1",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.stdout.count("2 data-parallel ranks") == 1  # rank 0 alone prints
    assert sum(line.startswith("nvfp4 ") for line in r.stdout.splitlines()) == 1
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert data["ranks"] == row["ranks"] == 2
    assert 3 * 8 <= row["generated_tokens"] <= 9 * 8  # both ranks' completions (2 prompts x 4), not one rank's
    assert row["allreduce_s"] > 0 and len(row["peak_gib_ranks"]) == 2
    assert row["step_tok_s"] == pytest.approx(row["generated_tokens"] / row["step_s"])
