"""Run logging: metrics.jsonl (the source of truth), TensorBoard, optional W&B, and at
the end a PNG of reward / accuracy / entropy / sigma curves plus a Markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunLogger:
    def __init__(
        self, run_dir: Path, config: dict, tensorboard: bool = True, wandb: bool = False, resume: bool = False
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
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
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    panels = [
        ("reward_mean", "reward (train)"),
        ("accuracy", "accuracy"),
        ("entropy", "entropy (train policy)"),
        ("sigma", "AQN sigma"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label="train" if key == "accuracy" else None)
        if key == "accuracy":
            ev = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
            if ev:
                ax.plot(*zip(*ev), "o-", label="held-out (sampled)")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
