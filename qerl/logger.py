"""Run logging: metrics.jsonl (the source of truth), TensorBoard, optional W&B, and at
the end a PNG of reward / accuracy / entropy / sigma curves plus a Markdown summary."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path


class RunLogger:
    """`resume_step`: continue a run from its checkpoint at that step: rows logged after it (steps
    redone on resume) are dropped from metrics.jsonl and TensorBoard, so each step appears once."""

    def __init__(
        self, run_dir: Path, config: dict, tensorboard: bool = True, wandb: bool = False, resume_step: int | None = None
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is None:  # a fresh run: no earlier rows in metrics.jsonl or TensorBoard
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.dir / "tb", ignore_errors=True)
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge)
            except ImportError:
                self.tb = None
        self.wandb = None
        if wandb:
            import wandb as wb  # optional dependency: pip install wandb

            self.wandb = wb.init(project="qerl", config=config, dir=str(self.dir), resume="allow")

    def log(self, step: int, metrics: dict):
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(row, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a crash is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_run(run_dir: Path, title: str | None = None) -> Path:
    """curves.png: reward, accuracy (train and held-out), entropy and AQN sigma (log axis) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = run_figure(read_metrics(Path(run_dir) / "metrics.jsonl"), title or f"qerl run: {run_dir}")
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_figure(rows: list[dict], title: str):
    import matplotlib.pyplot as plt

    panels = [
        ("reward_mean", "reward (train)"),
        ("accuracy", "accuracy"),
        ("entropy", "entropy (train policy, nats/token)"),
        ("sigma", "AQN sigma (log axis; 0 in stage 0)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, name) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label="train" if key == "accuracy" else None)
        if key == "accuracy":
            ev = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
            if ev:
                ax.plot(*zip(*ev), "o-", label="held-out (sampled)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        if key == "sigma":  # symmetric log: the noise-free first stage (0) stays on the plot
            positive = [v for _, v in pts if v > 0]
            ax.set_yscale("symlog", linthresh=min(positive, default=1e-4))
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class ConsoleProgress:
    """Per-step console output: a progress bar in a terminal, one concise line per step otherwise
    (stdout redirected, a scheduler's log, `--no-progress`). A context manager: the bar stops and
    the cursor comes back however the block ends."""

    def __init__(self, total: int, done: int = 0, bar: bool = True):
        self.total, self.done, self.bar = total, done, None
        if bar and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=done)

    def __enter__(self) -> ConsoleProgress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, step: int, metrics: dict) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, description=describe(step, metrics))
        else:
            print(describe(step, metrics, self.total), flush=True)


def describe(step: int, m: dict, total: int | None = None) -> str:
    """One line for a step: `step 3/24 | reward 0.125 | acc 0.12 | ent 1.90 | sigma 1.0e-02 | 21.3s/step`."""
    parts = [f"step {step}" + (f"/{total}" if total else "")]
    for k, fmt in (
        ("reward_mean", "reward {:.3f}"),
        ("accuracy", "acc {:.2f}"),
        ("entropy", "ent {:.2f}"),
        ("sigma", "sigma {:.1e}"),
        ("eval_accuracy", "held-out {:.3f}"),
        ("step_s", "{:.1f}s/step"),
    ):
        if k in m:
            parts.append(fmt.format(m[k]))
    return " | ".join(parts)
