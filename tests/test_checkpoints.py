"""Run state on disk: verified checkpoints with fallback, partial writes cleaned up, a full disk in one
line, each step's metrics once after a resume, checks of the run before the model loads, the run's
summary and curves, and one line per step without a terminal."""

import json
import logging
import shutil

import pytest
import torch
from conftest import run_config

from qerl.config import load_config
from qerl.errors import QerlError
from qerl.logger import read_metrics, run_figure
from qerl.state import find_checkpoint, verify
from qerl.trainer import Trainer


@pytest.fixture(scope="module")
def two_checkpoints(tiny_llama, tmp_path_factory):
    """A run of 3 steps stopped after step 2, with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(run_config(tiny_llama, out), progress=False).train(until=2)
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_checkpoints_verify_and_name_the_damaged_file(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    ck = run / "checkpoints"
    assert verify(ck / "step-2") is None and find_checkpoint(run) == (ck / "step-2", 2)
    adapter = ck / "step-2" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    assert "adapter/adapter_model.safetensors has 100 bytes" in verify(ck / "step-2")
    state = ck / "step-1" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-30] ^= 0xFF  # same size, one byte flipped
    state.write_bytes(bytes(data))
    assert verify(ck / "step-1") == "state.pt does not match its checksum"
    with pytest.raises(QerlError, match="no intact checkpoint.*step-2 is damaged.*step-1 is damaged"):
        find_checkpoint(run)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_llama, two_checkpoints, tmp_path, caplog):
    run = _copy(two_checkpoints, tmp_path)
    state = run / "checkpoints" / "step-2" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (run / "checkpoints" / "latest").write_text('{"step": 2, "pa')  # and `latest` cut short
    with caplog.at_level(logging.WARNING):
        t = Trainer(run_config(tiny_llama, run, train={"resume": True}), progress=False)
    assert t.start_step == 1
    text = caplog.text
    assert f"{run / 'checkpoints' / 'latest'} is unreadable" in text, text
    assert "step-2 is damaged: state.pt has" in text and "resuming from" in text, text
    t.train()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_failed_write_leaves_no_partial_checkpoint_and_says_what_it_needs(
    tiny_llama, two_checkpoints, tmp_path, monkeypatch
):
    run = _copy(two_checkpoints, tmp_path)
    stale = run / "checkpoints" / ".tmp-step-7-12345"  # what a kill -9 mid-write leaves
    (stale / "adapter").mkdir(parents=True)
    t = Trainer(run_config(tiny_llama, run, train={"resume": True}), progress=False)
    assert not stale.exists()

    def full_disk(obj, path):  # what torch.save raises when the disk fills up
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(QerlError) as info:
        t.save(3)
    msg = str(info.value)
    assert "\n" not in msg and f"could not write {run / 'checkpoints' / 'step-3' / 'state.pt'}" in msg, msg
    assert "free on that disk, a checkpoint needs about" in msg and "KB" in msg, msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-1", "step-2"]
    assert find_checkpoint(run) == (run / "checkpoints" / "step-2", 2)


def test_resume_writes_each_steps_metrics_once(tiny_llama, tmp_path, digit_reward, capsys):
    run = tmp_path / "run"
    Trainer(run_config(tiny_llama, run, train={"max_steps": 4}), progress=False).train(until=3)
    # killed while writing step 3's checkpoint: its metrics are logged, its checkpoint is partial
    ck = run / "checkpoints"
    (ck / "step-3").rename(ck / ".tmp-step-3-99999")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3]
    capsys.readouterr()
    t = Trainer(run_config(tiny_llama, run, train={"max_steps": 4, "resume": True}), progress=True)
    assert t.start_step == 2
    summary = t.train()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert summary["steps"] == 4 and json.loads((run / "summary.json").read_text())["steps"] == 4
    assert not list(ck.glob(".tmp-*"))
    # stdout is not a terminal here: one line per step, no progress bar
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in lines] == ["step 3/4", "step 4/4"], lines
    assert "reward" in lines[0] and "s/step" in lines[0] and "held-out" in lines[1], lines
    md = (run / "summary.md").read_text()
    assert "steps: 4," in md
    assert f"last 5 steps: {summary['reward_last5']}" in md and len(str(summary["reward_last5"])) <= 5, md


@pytest.mark.parametrize(
    "train,message",
    [
        ({"max_steps": 2, "resume": True}, "checkpoint .*step-2 is at step 2; train.max_steps \\(2\\) must be above"),
        ({"resume": True, "output_dir": "elsewhere"}, "--resume: elsewhere does not exist"),
        ({"resume": True, "output_dir": "."}, "--resume: no checkpoint in"),
    ],
)
def test_resume_errors_come_before_the_model_loads(two_checkpoints, tmp_path, monkeypatch, train, message):
    monkeypatch.chdir(tmp_path)
    train = {"output_dir": str(two_checkpoints), **train}
    # a model that does not exist: the error must be the run's own, found first
    with pytest.raises(QerlError, match=message):
        Trainer(run_config(tmp_path / "no-model", two_checkpoints, train=train), progress=False)
    assert not (tmp_path / "elsewhere").exists()  # a failed --resume makes no directory


def test_run_checks_come_before_the_model_loads(tmp_path):
    no_model = tmp_path / "no-model"
    (tmp_path / "file").write_text("")
    with pytest.raises(QerlError, match="train.output_dir .*file is a file"):
        Trainer(run_config(no_model, tmp_path / "file"), progress=False)
    with pytest.raises(QerlError, match="train.output_dir .*cannot be written"):
        Trainer(run_config(no_model, tmp_path / "file" / "run"), progress=False)
    with pytest.raises(QerlError, match=r"rollout.prompts_per_step \(100000\) is more than the 50 training records"):
        Trainer(run_config(no_model, tmp_path / "run", rollout={"prompts_per_step": 100000}), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(QerlError, match="model.device is cuda, but no CUDA GPU is visible"):
            Trainer(run_config(no_model, tmp_path / "run", model={"device": "cuda"}), progress=False)


def test_a_fresh_run_does_not_replace_an_earlier_runs_checkpoints(tmp_path):
    """Without --resume or --overwrite, a run dir holding checkpoints is a one-line error before the model loads
    (nothing deleted); --overwrite passes that check (and then fails here only at the missing model)."""
    no_model, earlier = tmp_path / "no-model", tmp_path / "earlier"
    (earlier / "checkpoints" / "step-12").mkdir(parents=True)
    (earlier / "checkpoints" / "step-3").mkdir()
    msg = r"holds an earlier run \(checkpoints up to step 12\): --resume continues it, --overwrite starts over"
    with pytest.raises(QerlError, match=msg):
        Trainer(run_config(no_model, earlier), progress=False)
    assert (earlier / "checkpoints" / "step-12").is_dir()
    cfg = run_config(no_model, earlier, train={"overwrite": True})
    assert load_config(None, ["--overwrite"]).train.overwrite is True  # the CLI flag
    with pytest.raises(Exception) as e:
        Trainer(cfg, progress=False)
    assert "earlier run" not in str(e.value)


def test_curves_have_a_title_and_sigma_on_a_log_axis():
    rows = [{"step": s, "reward_mean": 0.1 * s, "sigma": 0.0 if s < 2 else 1e-2 / s} for s in range(1, 6)]
    fig = run_figure(rows, "my run")
    assert fig._suptitle.get_text() == "my run"
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales["AQN sigma (log axis; 0 in stage 0)"] == "symlog" and scales["reward (train)"] == "linear"
