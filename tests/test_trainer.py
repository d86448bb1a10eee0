"""The training loop on a tiny random model: one update, resume, NaN guard, config errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_checkpoint, run_config

from qerl.errors import QerlError
from qerl.loading import load_model
from qerl.lora import lora_parameters
from qerl.rl import LossConfig, policy_loss
from qerl.trainer import Trainer
from qerl.update import build_batch, policy_update, sequence_logprobs


@pytest.fixture
def tiny(tiny_llama):
    return tiny_llama


def _fixed_batch(model, tok, n=6, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 90, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]
    comps = [torch.randint(3, 90, (length,), generator=g) for _ in range(n)]
    masks = [torch.arange(length) < int(torch.randint(2, length + 1, (1,), generator=g)) for _ in range(n)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5])[:n]
    logps = [torch.zeros(length) for _ in range(n)]
    b = build_batch(prompts, comps, masks, logps, adv, tok.pad_token_id, model.device)
    with torch.no_grad():
        b.rollout_logp = sequence_logprobs(model, b, 1.0)[0]  # on-policy rollout
    return b


def test_one_update_changes_only_lora_and_lowers_the_surrogate(tiny):
    torch.manual_seed(0)
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=4, device="cpu")
    params = lora_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _fixed_batch(model, tok)
    cfg = LossConfig(aggregation="token_mean")
    old = batch.rollout_logp.clone()
    loss0, _ = policy_loss(old, old, batch.advantages, batch.mask, cfg)
    opt = torch.optim.AdamW(params, lr=1e-2)
    m = policy_update(
        model,
        opt,
        params,
        batch,
        cfg,
        temperature=1.0,
        micro_batch_size=4,
        num_iterations=1,
        max_grad_norm=1.0,
        is_level="token",
        is_mode="truncate",
        is_threshold=2.0,
    )
    assert m["skipped_updates"] == 0 and m["grad_norm"] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), changed
    assert any(k.endswith("lora_B") for k in changed)  # B starts at zero and must move
    with torch.no_grad():
        new_logp = sequence_logprobs(model, batch, 1.0)[0]
    loss1, _ = policy_loss(new_logp, old, batch.advantages, batch.mask, cfg)
    # At ratio 1 the surrogate is -mean(A) over tokens; one step along the gradient lowers it.
    assert float(loss1) < float(loss0) - 1e-4, (float(loss0), float(loss1))


def test_nan_loss_skips_the_update_and_keeps_the_adapter(tiny):
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=4, device="cpu")
    params = lora_parameters(model)
    batch = _fixed_batch(model, tok)
    batch.advantages[0] = float("nan")
    row0 = int(batch.mask[0].sum())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    kw = dict(micro_batch_size=8, num_iterations=1, max_grad_norm=1.0, is_level="token", is_mode="truncate")

    def update():
        return policy_update(model, opt, params, batch, LossConfig(), temperature=1.0, is_threshold=2.0, **kw)

    # the warning says where: the NaN advantage's row, every one of its loss tokens, nothing else
    where = rf"micro-batch 0: non-finite {row0} of {int(batch.mask.sum())} advantages\): update skipped"
    with pytest.warns(UserWarning, match=where):
        m = update()
    assert m["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    batch.advantages[0] = 1.0
    batch.rollout_logp[1, 0] = float("nan")  # one token of the sampler's log-probs
    with pytest.warns(UserWarning, match=r"non-finite 1 of \d+ the rollout's log-probs\)"):
        m = update()
    assert m["skipped_updates"] == 1


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


KEYS = ("reward_mean", "loss", "entropy", "grad_norm", "mismatch_kl", "sigma", "lr")


def test_resume_continues_exactly(tiny, tmp_path, digit_reward):
    full = Trainer(run_config(tiny, tmp_path / "full"), progress=False)
    full.train()
    ref = {r["step"]: r for r in _rows(tmp_path / "full") if "loss" in r}
    assert ref[3]["grad_norm"] > 0  # the run actually learned something

    first = Trainer(run_config(tiny, tmp_path / "split"), progress=False)
    assert first.train(until=1) == {"stopped_at": 1}
    resumed = Trainer(run_config(tiny, tmp_path / "split", train={"resume": True}), progress=False)
    assert resumed.start_step == 1
    resumed.train()
    got = {r["step"]: r for r in _rows(tmp_path / "split") if "loss" in r}
    for step in (2, 3):
        for k in KEYS:
            assert math.isclose(got[step][k], ref[step][k], rel_tol=1e-5, abs_tol=1e-7), (
                step,
                k,
                got[step][k],
                ref[step][k],
            )
    a = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if ".lora_" in n:
            torch.testing.assert_close(p, a[n], rtol=1e-5, atol=1e-7)
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "curves.png", "summary.md"):
        assert (tmp_path / "split" / f).exists(), f


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  tempreature: 0.5\n")
    for args in (["-c", str(bad)], ["--rollout.group_size", "eight"], ["-c", str(tmp_path / "missing.yaml")]):
        r = subprocess.run(
            [sys.executable, "-m", "qerl.cli", "train", *args], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("qerl: error:"), r.stderr
    r = subprocess.run([sys.executable, "-m", "qerl.cli", "train", "-c", str(bad)], capture_output=True, text=True)
    assert "rollout.tempreature" in r.stderr


def test_skipping_zero_advantage_sequences_keeps_the_gradient(tiny):
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=4, device="cpu")
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    batch = _fixed_batch(model, tok)
    batch.advantages = torch.tensor([1.0, 0.0, 0.0, -0.5, 0.0, 2.0])
    for agg in ("token_mean", "seq_mean", "constant"):
        cfg = LossConfig(aggregation=agg, max_completion_len=5)
        model.zero_grad()
        model.train()
        logp, _ = sequence_logprobs(model, batch, 1.0)
        loss, _ = policy_loss(logp, logp.detach(), batch.advantages, batch.mask, cfg)
        loss.backward()
        want = [p.grad.clone() for p in params]
        start = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=1.0)
        m = policy_update(
            model,
            opt,
            params,
            batch,
            cfg,
            temperature=1.0,
            micro_batch_size=2,
            num_iterations=1,
            max_grad_norm=1e9,
            is_level="token",
            is_mode="none",
            is_threshold=2.0,
        )
        assert m["active_seqs"] == 3
        for s0, p, g in zip(start, params, want):
            torch.testing.assert_close(s0 - p.detach(), g, rtol=1e-4, atol=1e-7)
        with torch.no_grad():
            for s0, p in zip(start, params):
                p.copy_(s0)


def test_dapo_and_drgrpo_steps_run_with_their_settings(tiny, tmp_path, digit_reward):
    for name in ("dapo", "drgrpo"):
        extra = {"algo": {"name": name, "max_sampling_rounds": 2}, "train": {"max_steps": 1, "save_every": 0}}
        if name == "dapo":
            extra["algo"]["overlong"] = "mask"
        t = Trainer(run_config(tiny, tmp_path / name, **extra), progress=False)
        m = t.step(0)
        assert t.algo.aggregation == {"dapo": "token_mean", "drgrpo": "constant"}[name]
        assert t.algo.normalize_std is (name == "dapo")
        assert 1 <= m["sampling_rounds"] <= 2
        if name == "dapo":
            assert t.loss_cfg.eps_high == 0.28


@pytest.mark.parametrize("arch,ckpt", [("llama", False), ("qwen2", True)])
def test_shared_prompt_forward_equals_per_sequence_forward(tmp_path, arch, ckpt):
    """One prompt forward per group gives the same log-probs and LoRA gradients as one per sequence."""
    path = make_tiny_checkpoint(tmp_path / arch, arch, seed=7, std=0.05)
    model, tok = load_model(path, quant="nvfp4", lora_rank=4, device="cpu")
    model.gradient_checkpointing = ckpt
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    group, n_prompts, length = 3, 2, 5
    prompts = [torch.randint(3, 90, (k,), generator=g).tolist() for k in (4, 7)]
    rows = [prompts[i // group] for i in range(group * n_prompts)]
    comps = [torch.randint(3, 90, (length,), generator=g) for _ in rows]
    masks = [torch.arange(length) < k for k in (5, 3, 4, 5, 2, 1)]
    b = build_batch(
        rows, comps, masks, [torch.zeros(length)] * len(rows), torch.zeros(len(rows)), tok.pad_token_id, "cpu"
    )
    model.train()
    out = {}
    for grp in (1, group):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, b, 1.0, group=grp)
        (logp * b.mask).sum().backward()
        out[grp] = (logp.detach(), ent.detach(), [p.grad.clone() for p in params])
    m = b.mask
    torch.testing.assert_close(out[1][0][m], out[group][0][m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1][1][m], out[group][1][m], rtol=1e-4, atol=1e-5)
    for a, c in zip(out[1][2], out[group][2]):
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-6)


def test_a_broken_adapter_stops_the_run_with_no_checkpoint(tiny, tmp_path):
    """A non-finite adapter weight (as a corrupt optimizer state leaves it) makes every later loss non-finite:
    the step that skips its update says so in one line and stops, and no checkpoint of it is written.
    (Rewards alternate within each group, so every group is informative whatever the completions.)"""
    from qerl.bench_step import alternating_rewards
    from qerl.errors import QerlError

    cfg = run_config(tiny, tmp_path / "run", train={"max_steps": 3, "save_every": 1})
    t = Trainer(cfg, progress=False, reward_fn=alternating_rewards)
    t.train(until=1)
    name, p = next((n, p) for n, p in t.model.named_parameters() if n.endswith("lora_B"))
    with torch.no_grad():
        p[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="update skipped"), pytest.raises(QerlError, match="skipped its update") as e:
        t.step(1)
    assert "1 trained tensors hold non-finite values (first: " + name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QerlError, match="before the checkpoint of step 2"):
        t.save(2)
    assert sorted(x.name for x in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-1"]


def test_runs_of_any_seed_score_the_held_out_problems_qerl_eval_scores(tiny, tmp_path):
    from qerl.data import load_records

    runs = {s: Trainer(run_config(tiny, tmp_path / f"s{s}", train={"seed": s}), progress=False) for s in (5, 6)}
    scored, _ = load_records("arithmetic", "test", limit=4)  # what `qerl eval` loads for the same limit
    for t in runs.values():
        assert [r.question for r in t.eval_recs] == [r.question for r in scored]
    train = [[r.question for r in t.sampler.records] for t in runs.values()]
    assert train[0] != train[1]  # the training problems still follow the seed


def test_a_resumed_run_takes_the_configs_optimizer_settings_and_refuses_another_adapter(tiny, tmp_path, digit_reward):
    """A finished 3-step run continued to 5 steps at another rate: the first new step runs at the new
    schedule's rate for its step (not the old schedule's end, 0), with the config's betas and decay; another
    LoRA rank or format is a one-line error before any model loads."""
    run = tmp_path / "run"
    Trainer(run_config(tiny, run, optim={"lr": 1e-2, "min_lr_ratio": 0.0}), progress=False).train()
    assert [r["lr"] for r in _rows(run) if "lr" in r][-1] > 0
    more = {"lr": 3e-2, "betas": [0.8, 0.95], "weight_decay": 0.05, "min_lr_ratio": 0.0}
    cfg = run_config(tiny, run, optim=more, train={"resume": True, "max_steps": 5})
    resumed = Trainer(cfg, progress=False)
    warm = max(1, int(cfg.optim.warmup_ratio * 5))
    want = 3e-2 * 0.5 * (1 + math.cos(math.pi * (3 - warm) / (5 - warm)))  # step index 3 of the 5-step schedule
    g = resumed.optimizer.param_groups[0]
    assert math.isclose(g["lr"], want, rel_tol=1e-9) and g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.05
    before = {n: p.detach().clone() for n, p in resumed.model.named_parameters() if ".lora_" in n}
    resumed.train()
    rows = {r["step"]: r for r in _rows(run) if "lr" in r}
    assert math.isclose(rows[4]["lr"], want, rel_tol=1e-9) and rows[5]["lr"] > 0
    after = dict(resumed.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())  # the continued steps learned

    for key, value in (("lora_rank", 8), ("quant", "bf16")):
        bad = run_config(tiny, run, model={key: value}, train={"resume": True, "max_steps": 7})
        with pytest.raises(QerlError, match=f"--resume: model.{key} is"):
            Trainer(bad, progress=False)


def test_overwrite_leaves_nothing_of_the_earlier_run_but_the_users_own_files(tiny, tmp_path):
    run = tmp_path / "run"
    Trainer(run_config(tiny, run, train={"max_steps": 2, "eval_every": 1}), progress=False).train()
    assert (run / "eval" / "step-2.jsonl").exists() and len(list((run / "tb").iterdir())) == 1
    (run / "notes.txt").write_text("mine")
    Trainer(run_config(tiny, run, train={"max_steps": 1, "overwrite": True}), progress=False).train()
    assert not (run / "eval" / "step-2.jsonl").exists() and (run / "notes.txt").read_text() == "mine"
    assert len(list((run / "tb").iterdir())) == 1  # one event file: TensorBoard shows this run only
    assert [r["step"] for r in _rows(run) if "reward_mean" in r] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-1"]


def test_training_on_own_data_with_the_default_held_out_set_warns(tiny, tmp_path):
    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    cfg = run_config(tiny, tmp_path / "run", data={"train": str(rows)})
    with pytest.warns(UserWarning, match=f"training on {rows} but scoring held-out accuracy on arithmetic:1"):
        Trainer(cfg, progress=False)
