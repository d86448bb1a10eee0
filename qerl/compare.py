"""`qerl compare`: one task trained under several configurations x seeds, and a report of them.

An experiment file (YAML) names the configurations and the seeds:

    base: null                  # a config file the configurations start from; null: the embedded default
    seeds: [0, 1, 2]
    overrides: {train: {max_steps: 24}}   # shared by every configuration (steps, data, ...)
    configs:                    # name -> overrides on top of base + shared overrides
      bf16: {model: {quant: bf16}, aqn: {enabled: false}}
      nvfp4_aqn: {}
    output_dir: experiments/ablation     # runs: <output_dir>/<config>/seed<N>/ (checkpoints, adapters: not committed)
    report: docs/results.md              # the table; the kept small files and PNGs in docs/results/

Overrides are nested mappings or dotted keys (`optim.lr: 5e-4`). Every configuration x seed trains with
the same steps and data in its own directory, seeds in the outer loop (so a partial sweep has every
configuration's first seed). A run is finished when its summary exists, says it completed its steps,
and its config.json is the one the file asks for; a finished run is skipped. Each finished run's small
files (metrics.jsonl, summary.json, config.json, the eval summaries, run.json with the wall time) are kept
in `<results>/<config>/seed<N>/`, which counts as finished too: the table can be filled across sittings
and checkouts. The report is made from the kept files only.
"""

from __future__ import annotations

import gc
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QerlError
from .logger import read_metrics

KEPT = ("metrics.jsonl", "summary.json", "config.json", "run.json")


@dataclass
class Experiment:
    path: Path
    configs: dict[str, dict]
    seeds: list[int]
    base: str | None = None
    overrides: dict = field(default_factory=dict)
    output_dir: Path = Path("experiments")
    report: Path = Path("docs/results.md")
    notes: str = ""  # Markdown put into the report under the table (the reasons behind the settings)
    # CPU threads the runs used (the report's command sets OMP_NUM_THREADS to it); None: every core
    threads: int | None = None

    @property
    def results_dir(self) -> Path:
        """The committed folder of kept per-run files and PNGs: docs/results.md -> docs/results/."""
        return self.report.with_suffix("")

    def config(self, name: str, seed: int, run_dir: Path):
        from .config import load_config

        over = deep_merge(self.overrides, self.configs[name])
        over = deep_merge(
            over, {"train": {"seed": seed, "output_dir": str(run_dir), "resume": False, "overwrite": True}}
        )
        return load_config(self.base, over)

    def runs(self):
        """(config name, seed) in training order: seeds outer, configurations in file order inner."""
        return [(name, seed) for seed in self.seeds for name in self.configs]

    def run_dir(self, name: str, seed: int) -> Path:
        return self.output_dir / name / f"seed{seed}"

    def kept_dir(self, name: str, seed: int) -> Path:
        return self.results_dir / name / f"seed{seed}"


def nested(d: dict, where: str) -> dict:
    """Dotted keys (`optim.lr: 1e-4`) -> nested mappings; nested mappings pass through."""
    if not isinstance(d, dict):
        raise QerlError(f"{where}: expected a mapping of config overrides, got {d!r}")
    out: dict = {}
    for k, v in d.items():
        parts = str(k).split(".")
        v = nested(v, f"{where}.{k}") if isinstance(v, dict) else v
        cur = out
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = deep_merge(cur.get(parts[-1], {}), v) if isinstance(v, dict) else v
    return out


def deep_merge(a: dict, b: dict) -> dict:
    """`b` over `a`, mappings merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_experiment(path: str | Path) -> Experiment:
    import yaml

    from .config import read_yaml

    p = Path(path)
    if not p.exists():
        raise QerlError(f"experiment file not found: {p}")
    try:
        data = read_yaml(p) or {}
    except yaml.YAMLError as e:
        raise QerlError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    known = {"base", "seeds", "overrides", "configs", "output_dir", "report", "notes", "threads"}
    if not isinstance(data, dict) or set(data) - known:
        unknown = (
            f" (not {', '.join(map(repr, sorted(map(str, set(data) - known))))})" if isinstance(data, dict) else ""
        )
        raise QerlError(f"{p}: the top level must be a mapping with keys among {', '.join(sorted(known))}{unknown}")
    for key in ("base", "output_dir", "report"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise QerlError(f"{p}: '{key}' must be a path, got {data[key]!r}")
    configs = data.get("configs") or {}
    if not isinstance(configs, dict) or not configs:
        raise QerlError(f"{p}: 'configs' must map each configuration's name to its overrides")
    for name in configs:
        if not str(name).replace("-", "_").replace(".", "_").isidentifier():
            raise QerlError(f"{p}: configuration name {name!r}: use letters, digits, '_', '-', '.'")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise QerlError(f"{p}: 'seeds' must be a list of integers >= 0, got {seeds!r}")
    exp = Experiment(
        path=p,
        configs={str(k): nested(v or {}, f"{p}: configs.{k}") for k, v in configs.items()},
        seeds=seeds,
        base=data.get("base"),
        overrides=nested(data.get("overrides") or {}, f"{p}: overrides"),
        output_dir=Path(data.get("output_dir") or Path("experiments") / p.stem),
        report=Path(data.get("report") or "docs/results.md"),
        notes=str(data.get("notes") or ""),
        threads=data.get("threads"),
    )
    if exp.threads is not None and not (isinstance(exp.threads, int) and exp.threads >= 1):
        raise QerlError(f"{p}: 'threads' must be an integer >= 1, got {exp.threads!r}")
    for name, seed in exp.runs():  # every configuration is valid before anything trains
        try:
            exp.config(name, seed, exp.run_dir(name, seed))
        except QerlError as e:
            raise QerlError(f"{p}: configuration {name!r}: {e}") from None
    return exp


# --- finished runs ------------------------------------------------------------------------------
def _config_json(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def config_diff(d: Path, cfg) -> list[str] | None:
    """The settings in which `d`'s config.json differs from `cfg` (None: no config.json). The output
    directory and the resume and overwrite flags do not count (where and how a run is kept, not what it
    trains), nor keys added to the config since the run."""
    try:
        saved = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return [
        f"{sec}.{k}: {saved[sec][k]!r} -> {v!r}"
        for sec, keys in _config_json(cfg).items()
        for k, v in keys.items()
        if k not in ("output_dir", "resume", "overwrite") and k in saved.get(sec, {}) and saved[sec][k] != v
    ]


def finished(d: Path, cfg) -> str | None:
    """Why `d` is not a finished run of `cfg` (None: it is one)."""
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return "no summary"
    ev = summary.get("eval") or []
    if not ev or ev[-1][0] != cfg.train.max_steps:
        return f"stopped before step {cfg.train.max_steps}"
    diff = config_diff(d, cfg)
    if diff is None:
        return "no config.json"
    return f"its config differs ({'; '.join(diff)})" if diff else None


def resumable(run_dir: Path, cfg) -> int | None:
    """The step of an unfinished run's newest intact checkpoint under the same config (None: start afresh)."""
    from .state import find_checkpoint

    if config_diff(run_dir, cfg) != []:
        return None
    try:
        found = find_checkpoint(run_dir)
    except QerlError:  # checkpoints, none intact
        return None
    return found[1] if found and found[1] < cfg.train.max_steps else None


def keep(run_dir: Path, kept: Path) -> None:
    """Copy a finished run's small files (no checkpoints, no adapter, no per-example eval rows) to `kept`."""
    if kept.exists():
        shutil.rmtree(kept)
    (kept / "eval").mkdir(parents=True)
    for name in KEPT:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, kept / name)
    for f in sorted((run_dir / "eval").glob("*.summary.json")):
        shutil.copy2(f, kept / "eval" / f.name)


def run_experiment(exp: Experiment) -> dict:
    """Train every unfinished configuration x seed (one line per run started / skipped / finished),
    then write the report. -> {"trained": [...], "skipped": [...], "failed": [...]}."""
    from .trainer import Trainer

    done: dict[str, list] = {"trained": [], "skipped": [], "failed": []}
    runs = exp.runs()
    for i, (name, seed) in enumerate(runs, 1):
        run_dir, kept = exp.run_dir(name, seed), exp.kept_dir(name, seed)
        cfg = exp.config(name, seed, run_dir)
        tag = f"qerl compare: [{i}/{len(runs)}] {name} seed {seed}"
        if finished(run_dir, cfg) is None:
            if finished(kept, cfg) is not None:
                keep(run_dir, kept)
            print(f"{tag}: skipped, finished in {run_dir}", flush=True)
            done["skipped"].append((name, seed))
            continue
        if finished(kept, cfg) is None:
            print(f"{tag}: skipped, finished (kept files in {kept})", flush=True)
            done["skipped"].append((name, seed))
            continue
        resume = resumable(run_dir, cfg)
        earlier = 0.0  # a resumed run's wall time: its steps before the checkpoint (not their evals) + this sitting
        if resume is not None:
            cfg.train.resume = True
            earlier = sum(r.get("step_s", 0) for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= resume)
            print(f"{tag}: resumed at step {resume} in {run_dir}", flush=True)
        else:
            print(f"{tag}: started in {run_dir} ({finished(run_dir, cfg)})", flush=True)
        t0 = time.time()
        try:
            trainer = Trainer(cfg, progress=False)
            summary = trainer.train()
        except Exception as e:  # one failed run does not stop the sweep (Ctrl-C still does)
            print(f"{tag}: FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {e}", flush=True)
            done["failed"].append((name, seed))
            continue
        finally:
            trainer = None
            gc.collect()
        wall = time.time() - t0 + earlier
        if "stopped_at" in summary:  # Ctrl-C / SIGTERM: checkpointed; the sweep stops, the next one resumes it
            print(f"{tag}: stopped at step {summary['stopped_at']}; the sweep stops", flush=True)
            break
        run_info = {"wall_s": round(wall, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if resume is not None:
            run_info["resumed_at_step"] = resume
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2))
        keep(run_dir, kept)
        print(
            f"{tag}: finished in {wall / 60:.1f} min, held-out {summary['eval_start']} -> {summary['eval_end']}",
            flush=True,
        )
        done["trained"].append((name, seed))
    write_report(exp)
    return done


# --- the report ---------------------------------------------------------------------------------
def run_stats(d: Path) -> dict:
    """One kept run's numbers: held-out accuracy before / after, mean reward of the last 20% of steps,
    mean entropy of the first 20%, wall time, and its reward / entropy per step."""
    summary = json.loads((d / "summary.json").read_text())
    rows = list({r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "reward_mean" in r}.values())
    n = max(1, round(0.2 * len(rows)))
    reward = {r["step"]: r["reward_mean"] for r in rows}
    entropy = {r["step"]: r["entropy"] for r in rows if "entropy" in r}
    first = [entropy[r["step"]] for r in rows[:n] if r["step"] in entropy]
    wall = json.loads((d / "run.json").read_text())["wall_s"] if (d / "run.json").exists() else summary["total_s"]
    return {
        "acc_before": summary["eval_start"],
        "acc_after": summary["eval_end"],
        "reward_last": statistics.fmean(r["reward_mean"] for r in rows[-n:]) if rows else math.nan,
        "entropy_first": statistics.fmean(first) if first else math.nan,
        "wall_min": wall / 60,
        "reward": reward,
        "entropy": entropy,
    }


def _mean_std(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.fmean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def collect(exp: Experiment) -> dict[str, dict[int, dict]]:
    """{config: {seed: run_stats}} of the finished runs' kept files (configurations with none are absent)."""
    out: dict[str, dict[int, dict]] = {}
    for name, seed in exp.runs():
        kept = exp.kept_dir(name, seed)
        why = finished(kept, exp.config(name, seed, exp.run_dir(name, seed)))
        if why is None:
            out.setdefault(name, {})[seed] = run_stats(kept)
        elif kept.exists():  # e.g. kept from a run under an earlier default: left out of the table, said why
            print(f"qerl compare: {name} seed {seed}: the kept files in {kept} are left out: {why}", flush=True)
    return out


def _curves_png(out: Path, title: str, draw) -> Path:
    """A PNG of two panels, reward and entropy against steps; `draw(ax, key)` fills each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in ((axes[0], "reward", "reward (train)"), (axes[1], "entropy", "entropy (nats/token)")):
        draw(ax, key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _seed_means(runs: dict[int, dict], key: str) -> tuple[list[int], list[list[float]]]:
    """The steps any seed logged `key` at, and each step's values over the seeds."""
    steps = sorted({s for r in runs.values() for s in r[key]})
    return steps, [[r[key][s] for r in runs.values() if s in r[key]] for s in steps]


def plot_config(name: str, runs: dict[int, dict], out: Path) -> Path:
    """Reward and entropy against steps: the mean over seeds, a min-max band, each seed faintly."""

    def draw(ax, key):
        steps, vals = _seed_means(runs, key)
        for r in runs.values():
            ax.plot(sorted(r[key]), [r[key][s] for s in sorted(r[key])], lw=0.7, alpha=0.35)
        if len(runs) > 1:
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2, label="min-max")
        mean = [statistics.fmean(v) for v in vals]
        ax.plot(steps, mean, ".-", lw=2, color="k", label=f"mean of {len(runs)} seeds" if len(runs) > 1 else None)

    seeds = ", ".join(map(str, sorted(runs)))
    return _curves_png(out, f"{name}: seed{'s' if len(runs) > 1 else ''} {seeds}", draw)


def plot_overview(stats: dict[str, dict[int, dict]], out: Path) -> Path:
    """Every configuration's mean reward and entropy over its seeds, on shared axes."""

    def draw(ax, key):
        for name, runs in stats.items():
            steps, vals = _seed_means(runs, key)
            ax.plot(steps, [statistics.fmean(v) for v in vals], ".-", label=f"{name} (seeds: {len(runs)})")

    return _curves_png(out, "all configurations: mean over seeds", draw)


def command(exp: Experiment, report_only: bool = False) -> str:
    args = ["qerl", "compare", str(exp.path)] + (["--report-only"] if report_only else [])
    return (f"OMP_NUM_THREADS={exp.threads} " if exp.threads else "") + shlex.join(args)


def write_report(exp: Experiment) -> Path:
    """docs/results.md: the table (mean ± std over the finished seeds), one PNG per configuration, the
    commands that reproduce it, and the settings of each configuration."""
    stats = collect(exp)
    lines = [
        f"# Results: {exp.path.stem}",
        "",
        f"Written by `qerl compare` from the finished runs' kept files in `{exp.results_dir}/` "
        f"({sum(len(v) for v in stats.values())} of {len(exp.runs())} runs finished). Reproduce:",
        "",
        "```bash",
        f"{command(exp)}   # trains what is not finished (runs in {exp.output_dir}/), then writes this file",
        f"{command(exp, True)}   # this file again from the kept files, no training",
        "```",
        "",
        "Mean ± std over seeds (one seed: its value). Held-out accuracy: sampled at the run's "
        "eval temperature on the eval set, at step 0 and after the last step; reward: mean training reward of "
        "the last 20% of steps; entropy: the training policy's mean per-token entropy over the first 20% of steps; "
        "wall: the whole run (model load, evals, steps) in minutes.",
        "",
        "| configuration | seeds | held-out before | held-out after | reward, last 20% | entropy, first 20% | wall (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in exp.configs:
        runs = stats.get(name, {})
        vals = list(runs.values())
        cells = [
            _mean_std([r["acc_before"] for r in vals], "{:.3f}"),
            _mean_std([r["acc_after"] for r in vals], "{:.3f}"),
            _mean_std([r["reward_last"] for r in vals], "{:.3f}"),
            _mean_std([r["entropy_first"] for r in vals], "{:.2f}"),
            _mean_std([r["wall_min"] for r in vals], "{:.1f}"),
        ]
        seeds = f"{len(runs)}/{len(exp.seeds)}" + (f" ({', '.join(map(str, sorted(runs)))})" if runs else "")
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "Per run (held-out before -> after, reward last 20%, entropy first 20%, wall min):", ""]
    for name in exp.configs:
        for seed, r in sorted(stats.get(name, {}).items()):
            lines.append(
                f"- {name} seed {seed}: {r['acc_before']:.3f} -> {r['acc_after']:.3f}, "
                f"{r['reward_last']:.3f}, {r['entropy_first']:.2f}, {r['wall_min']:.1f}"
            )
    if exp.notes.strip():
        lines += ["", exp.notes.strip()]
    lines += ["", "## Configurations", ""]
    base = exp.base or "the embedded default (`configs/default.yaml`)"
    lines.append(f"Each starts from {base}, with `{json.dumps(exp.overrides)}` for all, and seeds {exp.seeds}:")
    lines.append("")
    for name, over in exp.configs.items():
        lines.append(f"- **{name}**: `{json.dumps(over)}`")
    lines += ["", "## Curves", ""]
    pngs = [("all configurations", plot_overview(stats, exp.results_dir / "overview.png"))] if stats else []
    pngs += [(n, plot_config(n, stats[n], exp.results_dir / f"{n}.png")) for n in exp.configs if n in stats]
    for name, png in pngs:
        lines += [f"![{name}]({png.relative_to(exp.report.parent).as_posix()})", ""]
    exp.report.parent.mkdir(parents=True, exist_ok=True)
    exp.report.write_text("\n".join(lines).rstrip() + "\n")
    print(f"qerl compare: report in {exp.report} ({sum(len(v) for v in stats.values())} finished runs)", flush=True)
    return exp.report


def main(path: str, report_only: bool = False) -> dict:
    exp = load_experiment(path)
    if report_only:
        write_report(exp)
        return {}
    print(f"qerl compare: {len(exp.configs)} configurations x {len(exp.seeds)} seeds from {path}", file=sys.stderr)
    return run_experiment(exp)
