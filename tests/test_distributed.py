"""Data-parallel RL (`qerl.distributed`): 2 CPU ranks under torchrun (gloo) train exactly as one process on
the same prompts and samples, a 2-rank checkpoint resumes on 1 rank, a rank that keeps no group neither
hangs nor drops the others' groups, and world sizes that do not split a step are one-line errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_config
from dist_worker import lora, trainer
from safetensors.torch import load_file

from qerl.config import load_config
from qerl.distributed import World, _buckets
from qerl.errors import QerlError
from qerl.logger import read_metrics
from qerl.modeling import ModelArgs
from qerl.plan import plan_memory
from qerl.rl import fill_batch
from qerl.trainer import Trainer

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """ROOT/one: the whole 3-step run in this process; ROOT/two, ROOT/again and ROOT/dapo: `dist_worker.py` on 2
    ranks."""
    root = tmp_path_factory.mktemp("dist")
    one = trainer(tiny_llama, root / "one")
    one.train()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run(
        [*cmd, str(WORKER), str(tiny_llama), str(root)], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return root, lora(one)


def _adapter(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors")


def test_two_ranks_train_as_one_process_on_the_same_samples(runs):
    root, _ = runs
    one, two = root / "one", root / "two"
    for step in (1, 2):
        a, b = _adapter(one, step), _adapter(two, step)
        assert a.keys() == b.keys() and any(not torch.equal(v, torch.zeros_like(v)) for v in a.values())
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    ranks = [torch.load(two / f"lora-rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the ranks' adapters stay identical
    ref = {r["step"]: r for r in read_metrics(one / "metrics.jsonl")}
    rows = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone logs (and evaluates: step 0)
    assert rows[0]["eval_accuracy"] == ref[0]["eval_accuracy"]
    for r in rows[1:]:
        want = ref[r["step"]]
        assert r["loss_tokens"] == want["loss_tokens"] and r["active_seqs"] == want["active_seqs"]
        for k in ("reward_mean", "reward_std", "accuracy", "completion_len", "grad_norm", "entropy", "mismatch_kl"):
            assert math.isclose(r[k], want[k], rel_tol=1e-4, abs_tol=1e-6), (r["step"], k, r[k], want[k])


def test_a_two_rank_checkpoint_resumes_on_two_ranks(runs):
    root, final = runs
    for r in (0, 1):  # resumed after step 2 on the same ranks, with samples fixed per prompt: as one process
        got = torch.load(root / "again" / f"lora-rank{r}.pt")
        for k in final:
            torch.testing.assert_close(got[k], final[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(root / "again" / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tiny_llama):
    root, final = runs
    state = torch.load(root / "two" / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's RNG states
    t = trainer(tiny_llama, root / "two", train={"resume": True})
    assert t.start_step == 2
    t.train()
    got = lora(t)
    for k in final:  # with samples fixed per prompt, the resumed run ends where the one-process run did
        torch.testing.assert_close(got[k], final[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(root / "two" / "metrics.jsonl")] == [0, 1, 2, 3]
    assert (root / "two" / "adapter" / "adapter_model.safetensors").exists()


def test_a_rank_that_keeps_no_group_still_takes_part(runs):
    """DAPO: rank 1's groups all have equal rewards, so it keeps none in either round; the batch is filled
    from rank 0's and both ranks apply the same update (rank 1 contributing zero gradients)."""
    root, _ = runs
    m = json.loads((root / "dapo" / "metrics-step0.json").read_text())
    assert m["sampling_rounds"] == 2 and m["sampling_filled"] == 0.0
    assert m["sampling_groups_sampled"] in (6.0, 8.0)  # 4, then ceil(missing / 2) for each of the 2 ranks
    assert m["skipped_updates"] == 0 and m["active_seqs"] > 0 and m["grad_norm"] > 0
    ranks = [torch.load(root / "dapo" / f"lora-rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


class _Rank1Of2:
    """Rank 1 of 2, rank 0's (kept, sampled) counts scripted per round."""

    rank, size = 1, 2

    def __init__(self, rank0):
        self.rank0 = iter(rank0)

    def gather(self, mine):
        return [next(self.rank0), mine]


def test_fill_batch_across_ranks_runs_the_same_rounds_and_keeps_the_global_order():
    asked, rounds = [], iter([(["a0", "a1"], [True, False]), (["b0"], [True])])

    def sample_round(n):
        asked.append(n)
        return next(rounds)

    # target 4: round 1 asks each rank for 2; rank 0 keeps 2, this rank 1 -> 3 kept, 1 missing;
    # round 2 asks each rank for ceil(1 / 2) = 1; rank 0's kept group comes first and fills the batch
    kept, stats = fill_batch(sample_round, 4, 5, _Rank1Of2([(2, 2), (1, 1)]))
    assert asked == [2, 1] and kept == ["a0"]
    assert stats == {"rounds": 2.0, "groups_sampled": 6.0, "groups_kept": 5.0, "keep_frac": 5 / 6, "filled": 1.0}


def test_world_of_one_is_a_no_op_and_buckets_split_gradients():
    w = World()
    assert w.sum(3, 4) == [3.0, 4.0] and w.gather("x") == ["x"] and w.broadcast(5) == 5 and w.share([1, 2]) == [1, 2]
    assert World(rank=1, size=2).share([1, 2, 3, 4]) == [3, 4]
    ps = [torch.zeros(n) for n in (3, 5, 2, 9)]
    assert [[p.numel() for p in b] for b in _buckets(ps, bucket_bytes=8 * 4)] == [[3, 5], [2], [9]]


def test_world_sizes_that_do_not_split_a_step_fail_before_the_model_loads(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-model"  # the error must come before the model is looked for
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(QerlError, match=r"prompts_per_step \(3\) does not divide across 2 ranks"):
        Trainer(run_config(missing, tmp_path / "run", rollout={"prompts_per_step": 3}), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(QerlError, match="4 ranks but rollout.prompts_per_step is 2"):
        Trainer(run_config(missing, tmp_path / "run"), progress=False)
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    args = ["train", "--model.name", str(missing), "--rollout.prompts_per_step", "3", "--output-dir", str(tmp_path)]
    r = subprocess.run([sys.executable, "-m", "qerl", *args], capture_output=True, text=True, env=env, timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "does not divide across 2 ranks" in lines[0], r.stderr


def test_plan_is_per_rank():
    cfg = load_config(None, {"rollout": {"prompts_per_step": 8, "group_size": 8}})
    a = ModelArgs.from_name("qwen2.5-7b")
    one, two = (plan_memory(a, cfg, ranks=n).components for n in (1, 2))
    kv = [k for k in one if k.startswith("rollout KV cache")][0]
    assert kv == "rollout KV cache (64 x 552 tokens)"
    assert two["rollout KV cache (32 x 552 tokens)"] == one[kv] / 2
    assert two["sampling logits"] == one["sampling logits"] / 2
    assert two[f"weights ({cfg.model.quant}, decoder Linears)"] == one[f"weights ({cfg.model.quant}, decoder Linears)"]
    assert "gradient all-reduce bucket (2 ranks)" in two
