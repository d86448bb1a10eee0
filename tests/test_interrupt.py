"""Ctrl-C and SIGTERM: the run finishes its step, checkpoints, says how to resume and exits 130 / 143;
a second Ctrl-C quits at once."""

import os
import shlex
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import run_overrides

from qerl.config import load_config
from qerl.interrupt import GracefulStop
from qerl.logger import read_metrics
from qerl.trainer import Trainer


def test_first_signal_is_recorded_and_a_second_ctrl_c_raises(capsys):
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # still the graceful stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert "SIGTERM: finishing this step, then saving a checkpoint" in capsys.readouterr().err
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.exit_code == 130


def test_ctrl_c_checkpoints_and_the_printed_command_resumes(tiny_llama, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    over = run_overrides(tiny_llama, run, train={"max_steps": 200, "save_every": 0, "eval_every": 0})
    config.write_text(yaml.safe_dump(over))
    cli = [sys.executable, "-m", "qerl.cli"]
    child = subprocess.Popen(
        [*cli, "train", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in child.stdout:  # not a terminal: one line per step
            if line.startswith("step 1/200 | "):
                child.send_signal(signal.SIGINT)
                break
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()  # a no-op once it has exited
    assert child.returncode == 130, err
    stopped = [x for x in err.splitlines() if x.startswith("qerl train: stopped after step")]
    assert len(stopped) == 1 and "(SIGINT)" in stopped[0], err
    step = int(stopped[0].split()[5])
    assert 1 <= step < 200 and (run / "checkpoints" / f"step-{step}" / "manifest.json").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] == step
    assert "Traceback" not in err, err
    command = shlex.split(stopped[0].split("continue with: ")[1])
    assert command[:2] == ["qerl", "train"] and command[-1] == "--resume", command
    assert command[2] == "-c"  # the same run, resumed (here in-process: a second interpreter costs seconds)
    resumed = Trainer(load_config(command[3], [*command[4:], "--max-steps", str(step + 1)]), progress=False)
    assert resumed.start_step == step
    resumed.train()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(step + 2))
