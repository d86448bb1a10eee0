"""The RL loop: load -> quantize -> rollout (with AQN) -> reward -> advantage -> update -> log/checkpoint.

Everything runs in one process on ONE copy of the weights: the engine samples from the
same `CausalLM` the optimizer updates, so rollouts always use the live adapter and the
AQN noise written into its norm weights reaches the sampling distribution.

Under torchrun (`qerl.distributed`) every rank runs this same loop on its share of each
step's prompts; what crosses ranks is named where it happens (`self.world`). With one
process `self.world` has size 1 and each of those calls returns at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .config import Config
from .data import build_prompt, load_records
from .distributed import check_shares, init, rank_device, rank_seed, world_from_env
from .errors import QerlError
from .evaluate import EvalSettings, evaluate
from .interrupt import GracefulStop
from .logger import ConsoleProgress, RunLogger, plot_run
from .lora import lora_parameters, quant_linears, save_adapter
from .noise import apply_noise, aqn_sigma, norm_weights
from .rewards import compute_rewards
from .rl import LossConfig, dynamic_sampling_keep, fill_batch, group_advantages
from .rollout import SamplingParams, dequant_cache, make_engine
from .state import checkpoint_dirs, find_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .update import build_batch, policy_update


class PromptSampler:
    """Shuffled passes over the training records; its position is part of the checkpoint."""

    def __init__(self, records, seed: int):
        self.records, self.seed, self.epoch, self.pos = records, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self):
        order = list(range(len(self.records)))
        random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        return order

    def take(self, n: int):
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.records[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._order = self._shuffle()


# What a run writes in its output_dir (an --overwrite removes these of the earlier run, and only these).
RUN_OUTPUTS = (
    "checkpoints",
    "adapter",
    "eval",
    "tb",
    "metrics.jsonl",
    "config.json",
    "summary.json",
    "summary.md",
    "curves.png",
)

# What a resumed run must share with the run it continues (the optimizer's settings, the steps and the data may
# change; the weights it loads may not).
RESUME_FIXED = ("model.name", "model.quant", "model.lora_rank", "model.lora_alpha", "model.train_norms")


def _dataset(spec: str, split: str, cfg: Config, limit=None, seed=0):
    # seed drives only the generated arithmetic task: the training problems follow the run's seed; the held-out
    # problems are seed 0's for every run, the set `qerl eval` scores, so runs of any seed score the same problems
    return load_records(
        spec, split, question_key=cfg.data.question_key, answer_key=cfg.data.answer_key, limit=limit, seed=seed
    )


class Trainer:
    """`Trainer(cfg).train()`. model/tokenizer, records (train, eval) and reward_fn (the signature
    of `compute_rewards`) may be given instead of loaded from `cfg`: `qerl bench step` times this
    class's own `step` on random weights that way."""

    update_path = "packed"  # `policy_update`'s path; "reference" is the padded oracle

    def __init__(self, cfg: Config, progress: bool = True, *, model=None, tokenizer=None, records=None, reward_fn=None):
        from .loading import default_device, load_model

        self.world = world_from_env()  # torchrun's ranks (size 1 without torchrun); no process group yet
        check_shares(cfg.rollout.prompts_per_step, cfg.rollout.group_size, self.world.size)
        main = self.world.is_main  # rank 0 alone prints, logs, evaluates and writes checkpoints
        self.cfg, self.progress = cfg, progress and sys.stdout.isatty() and main  # else one line per step
        self.reward_fn = reward_fn or compute_rewards
        self.algo = cfg.algo.resolved()
        t = cfg.train
        self.run_dir = Path(t.output_dir)
        if main:
            check_output_dir(self.run_dir, t.resume, t.overwrite)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        if records is None:  # data first: a bad path or an empty file fails in a second, before the model loads
            if main and cfg.data.eval.startswith("arithmetic") and not cfg.data.train.startswith("arithmetic"):
                warnings.warn(
                    f"training on {cfg.data.train} but scoring held-out accuracy on {cfg.data.eval} (data.eval's "
                    "default): set data.eval to your task's held-out set",
                    stacklevel=2,
                )
            train_recs, rep = _dataset(cfg.data.train, cfg.data.train_split, cfg, cfg.data.train_limit, cfg.train.seed)
            self.eval_recs, erep = _dataset(cfg.data.eval, cfg.data.eval_split, cfg, t.eval_limit)
            self.data_reports = [rep.summary(), erep.summary()]
            for r in (rep, erep) if main else ():
                if not r.n_skipped:  # reports with skipped rows were already logged as warnings
                    print(r.summary())
        else:
            train_recs, self.eval_recs = records
            self.data_reports = [
                f"{len(train_recs)} given training records",
                f"{len(self.eval_recs)} given eval records",
            ]
        if cfg.rollout.prompts_per_step > len(train_recs):
            raise QerlError(
                f"config: rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) is more than the "
                f"{len(train_recs)} training records of {cfg.data.train}"
            )
        m = cfg.model
        if m.device and m.device.startswith("cuda") and not torch.cuda.is_available():
            raise QerlError(f"config: model.device is {m.device}, but no CUDA GPU is visible")
        device = rank_device(m.device, self.world)
        self.world = init(model.device if model is not None else device or default_device())
        resume_from = self._checkpoint_to_resume() if t.resume else None
        if model is None:
            model, tokenizer = load_model(
                m.name,
                quant=m.quant,
                lora_rank=m.lora_rank,
                lora_alpha=m.lora_alpha,
                lora_dropout=m.lora_dropout,
                device=device,
                dtype=m.dtype,
            )
        self.model, self.tok = model, tokenizer
        self.device = self.model.device
        if self.device.type == "cuda":
            use_training_kernels(self.model)
        # auto: on a GPU, checkpoint as few layers as each micro-batch's activations need (see
        # `qerl.modeling.auto_checkpoint_layers`); on a CPU (small models) none
        gc = m.gradient_checkpointing
        self.model.gradient_checkpointing = {"on": True, "off": False}.get(
            gc, "auto" if self.device.type == "cuda" else False
        )
        self.engine = make_engine(self.model, self.tok, backend=cfg.rollout.backend)
        self.params = lora_parameters(self.model)
        self.norms = {}
        if m.train_norms:
            self.norms = {n: p for n, p in self.model.named_parameters() if n.endswith("layernorm.weight")}
            for p in self.norms.values():
                p.requires_grad_(True)
        o = cfg.optim
        groups = [{"params": self.params, "weight_decay": o.weight_decay}]
        if self.norms:
            groups.append({"params": list(self.norms.values()), "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        warm = max(1, int(o.warmup_ratio * t.max_steps))

        def lr_at(step):  # linear warmup, then cosine to min_lr_ratio
            if step < warm:
                return (step + 1) / warm
            frac = (step - warm) / max(1, t.max_steps - warm)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        self.loss_cfg = LossConfig(
            eps_low=self.algo.eps_low,
            eps_high=self.algo.eps_high,
            aggregation=self.algo.aggregation,
            kl_beta=self.algo.kl_beta,
            max_completion_len=cfg.rollout.max_new_tokens,
        )
        self.reward_cfg = cfg.reward
        if self.algo.overlong == "penalty" and self.reward_cfg.overlong == 0:
            self.reward_cfg = dataclasses.replace(self.reward_cfg, overlong=1.0)
        self.sampler = PromptSampler(train_recs, t.seed)
        self.gen = torch.Generator(self.device)  # the rollouts' sampling and AQN noise; one stream per rank
        self.gen.manual_seed(rank_seed(t.seed, self.world.rank))
        self.start_step = 0
        if resume_from:
            self.start_step, extra, restored = load_checkpoint(
                resume_from, self.model, self.optimizer, self.scheduler, self.gen, self.norms, rank=self.world.rank
            )
            self.sampler.load(extra["sampler"])  # the prompt order is global: the same on every rank
            if not restored:  # a rank the checkpoint's run did not have
                self.gen.manual_seed(rank_seed(t.seed, self.world.rank, self.start_step))
            # The config's optimizer settings hold from the first resumed step (the checkpoint's param groups
            # carry the old run's): a longer run continues on its own schedule, a new rate takes effect.
            self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
            for g, decay in zip(self.optimizer.param_groups, (o.weight_decay, 0.0)):
                g.update(betas=tuple(o.betas), weight_decay=decay, lr=o.lr * lr_at(self.scheduler.last_epoch))
        self.world.broadcast_(self.params + list(self.norms.values()))  # every rank starts from rank 0's adapter
        resume_step = self.start_step if t.resume else None
        if main and resume_step is None and checkpoint_dirs(self.run_dir):  # --overwrite (checked before loading)
            print(
                f"qerl train: --overwrite: removing the earlier run's outputs in {self.run_dir}: {', '.join(RUN_OUTPUTS)}"
            )
            for name in RUN_OUTPUTS:  # nothing else: the directory may hold the user's own files
                path = self.run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.logger = RunLogger(self.run_dir, cfg.to_dict(), wandb=t.wandb, resume_step=resume_step) if main else None

    def _checkpoint_to_resume(self) -> Path:
        """The newest intact checkpoint (checked before the model loads), or a one-line error.
        Rank 0 looks (it may clean up partial writes) and tells the others what it found."""
        found = None
        if self.world.is_main:
            try:
                found = find_checkpoint(self.run_dir)
            except QerlError as e:
                found = e
        found = self.world.broadcast(found)
        if isinstance(found, QerlError):
            raise found
        if found is None:
            raise QerlError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        path, step = found
        if self.cfg.train.max_steps <= step:
            raise QerlError(
                f"--resume: the checkpoint {path} is at step {step}; train.max_steps "
                f"({self.cfg.train.max_steps}) must be above it to continue"
            )
        self._check_resumable()
        return path

    def _check_resumable(self):
        """A resumed run continues the weights it loads: the base, its format and the adapter's shape must be
        the run's (its config.json); a one-line error names the first that differs."""
        saved = self.run_dir / "config.json"
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):  # a run directory of an older qerl, or none: nothing to compare
            return
        for key in RESUME_FIXED:
            section, name = key.split(".")
            was, now = old.get(section, {}).get(name), getattr(getattr(self.cfg, section), name)
            same_path = (
                key == "model.name" and Path(str(was)).exists() and Path(str(was)).resolve() == Path(now).resolve()
            )
            if was is not None and was != now and not same_path:
                raise QerlError(
                    f"--resume: {key} is {now!r} here but {was!r} in the run being resumed ({saved}); a resumed "
                    "run keeps its base and adapter: set it back, or start a new run in another output_dir"
                )

    # --- one step ------------------------------------------------------------------------
    def prompt_ids(self, records):
        d = self.cfg.data
        texts = [
            build_prompt(
                self.tok, r.question, system_prompt=d.system_prompt, suffix=d.suffix, chat_template=d.chat_template
            )
            for r in records
        ]
        return [self.tok(x, add_special_tokens=False).input_ids for x in texts]

    def rollout(self, step: int):
        """Sample G completions for each prompt under AQN noise; score them; keep informative groups."""
        r, G = self.cfg.rollout, self.cfg.rollout.group_size
        sigma = aqn_sigma(step, self.cfg.train.max_steps, self.cfg.aqn)
        params = SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            n=G,
            stop=tuple(r.stop),
        )

        def sample_round(n_groups):  # n_groups of this rank; every rank takes the round's prompts, keeps its share
            recs = self.world.share(self.sampler.take(n_groups * self.world.size))
            prompts = self.prompt_ids(recs)
            with apply_noise(self.model, sigma, self.gen):
                self.world.broadcast_(norm_weights(self.model))  # every rank samples under rank 0's noise
                out = self.engine.generate(prompts, params, generator=self.gen)
            golds = [rec.answer for rec in recs for _ in range(G)]
            rewards, parts = self.reward_fn(out.texts, golds, out.lengths, r.max_new_tokens, self.reward_cfg)
            rewards = torch.tensor(rewards)
            groups = [
                dict(
                    prompt=prompts[i],
                    out=out,
                    rows=range(i * G, (i + 1) * G),
                    rewards=rewards[i * G : (i + 1) * G],
                    correct=parts["correct"][i * G : (i + 1) * G],
                )
                for i in range(len(recs))
            ]
            keep = dynamic_sampling_keep(rewards, G) if self.algo.dynamic_sampling else [True] * len(recs)
            return groups, keep

        rounds = self.algo.max_sampling_rounds if self.algo.dynamic_sampling else 1
        groups, stats = fill_batch(sample_round, r.prompts_per_step, rounds, self.world)
        return groups, sigma, stats

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        groups, sigma, ds = self.rollout(step)
        t_roll = time.perf_counter() - t0
        G = self.cfg.rollout.group_size
        rewards = torch.cat([g["rewards"] for g in groups]) if groups else torch.zeros(0)
        metrics = {
            "sigma": sigma,
            "lr": self.optimizer.param_groups[0]["lr"],  # this step's
            **{f"sampling_{k}": v for k, v in ds.items()},
        }
        if self.world.sum(len(groups))[0]:  # every rank updates, also one whose share of the batch is empty
            batch = self.batch(groups, rewards)
            a = self.algo
            t_upd = time.perf_counter()
            upd = policy_update(
                self.model,
                self.optimizer,
                self.params + list(self.norms.values()),
                batch,
                self.loss_cfg,
                temperature=self.cfg.rollout.temperature,
                micro_batch_size=self.cfg.optim.micro_batch_size,
                num_iterations=a.num_iterations,
                max_grad_norm=self.cfg.optim.max_grad_norm,
                is_level=a.is_level,
                is_mode=a.is_mode,
                is_threshold=a.is_threshold,
                group=G,
                path=self.update_path,
                world=self.world,
            )
            metrics["update_s"] = time.perf_counter() - t_upd  # policy_update ends on host values: synchronized
            metrics.update(upd)
            if upd["skipped_updates"]:  # a non-finite loss: transient, unless the adapter itself is broken
                self.check_adapter(f"step {step} skipped its update for a non-finite loss, and")
        else:
            metrics["skipped_updates"] = 1.0  # dynamic sampling found no informative group
        with warnings.catch_warnings():  # the schedule follows rollout steps, also when an update was skipped
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        metrics["step_s"] = time.perf_counter() - t0
        metrics.update(batch_metrics(self.world.gather(self.rollout_record(groups, rewards, t_roll))))
        return metrics

    def batch(self, groups, rewards: torch.Tensor):
        """The update's `Batch` of this rank's groups: advantages per group, DAPO overlong masks."""
        G = self.cfg.rollout.group_size
        adv = group_advantages(rewards, G, normalize_std=self.algo.normalize_std) if groups else rewards
        prompts, comps, masks, logps = [], [], [], []
        for g in groups:
            for row in g["rows"]:
                prompts.append(g["prompt"])
                comps.append(g["out"].completion_ids[row])
                m = g["out"].mask[row]
                if self.algo.overlong == "mask" and g["out"].finish_reasons[row] == "length":
                    m = torch.zeros_like(m)  # DAPO overlong filtering: truncated answers teach nothing
                masks.append(m)
                logps.append(g["out"].logprobs[row])
        return build_batch(prompts, comps, masks, logps, adv, self.engine.pad_id, self.device)

    def rollout_record(self, groups, rewards: torch.Tensor, rollout_s: float) -> dict:
        """What this rank's rollouts were like (its share of the batch), for `batch_metrics`."""
        rows = [(g, r) for g in groups for r in g["rows"]]
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {
            "rewards": rewards.tolist(),
            "correct": [c for g in groups for c in g["correct"]],
            "lengths": [float(g["out"].mask[r].sum()) for g, r in rows],
            "truncated": [g["out"].finish_reasons[r] == "length" for g, r in rows],
            "rollout_s": rollout_s,
            "peak_mem_gb": peak,
        }

    def run_eval(self, step: int) -> dict:
        """Held-out accuracy, on rank 0 ({} at once on the other ranks)."""
        if not self.world.is_main:
            return {}
        t, d, r = self.cfg.train, self.cfg.data, self.cfg.rollout
        s = EvalSettings(
            samples=t.eval_samples,
            temperature=t.eval_temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop=tuple(r.stop),
            max_new_tokens=r.max_new_tokens,
            system_prompt=d.system_prompt,
            suffix=d.suffix,
            chat_template=d.chat_template,
            seed=t.seed + 7,
            answer_order=self.reward_cfg.answer_order,
        )
        res = evaluate(
            self.engine, self.eval_recs, s, self.run_dir / "eval" / f"step-{step}.jsonl", progress=self.progress
        )
        return {"eval_accuracy": res["pass@1"], f"eval_maj@{t.eval_samples}": res[f"maj@{t.eval_samples}"]}

    # --- the loop ------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict:
        """Run to `train.max_steps`, or stop after step `until` (checkpointed) to resume later.
        SIGINT / SIGTERM also stop it after the current step, checkpointed: the result then says
        `{"stopped_at": step, "signal": signum, "checkpoint": path}`. Ranks other than 0 return
        `{"rank": r}` at the end (rank 0 writes the adapter, the plots and the summary)."""
        t = self.cfg.train
        last = t.max_steps if until is None else min(until, t.max_steps)
        cpu = self.device.type == "cpu"
        main = self.world.is_main
        history, ck, signum = {}, None, 0
        with (
            dequant_cache(self.model, cpu),  # CPU: dequantize the frozen base once for the whole run
            GracefulStop() as stop,
            ConsoleProgress(t.max_steps, self.start_step, bar=self.progress) as console,
        ):
            if self.start_step == 0 and main:
                history["eval_start"] = self.run_eval(0)
                self.logger.log(0, history["eval_start"])
                console.update(0, history["eval_start"])
            for step in range(self.start_step, last):
                m = self.step(step)
                if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
                    m.update(self.run_eval(step + 1))
                if step + 1 == t.max_steps:
                    history["eval_end"] = self.run_eval(step + 1)
                    m.update(history["eval_end"])
                if main:
                    self.logger.log(step + 1, m)
                    console.update(step + 1, m)
                signum = int(self.world.max(stop.signum or 0)[0])  # a signal to any rank stops them all here
                if (t.save_every and (step + 1) % t.save_every == 0) or step + 1 in (t.max_steps, last) or signum:
                    ck = self.save(step + 1)
                if signum and step + 1 < t.max_steps:
                    last = step + 1
                    break
        if last < t.max_steps:
            if main:
                self.logger.close()
            return {"stopped_at": last} | ({"signal": signum, "checkpoint": ck} if signum else {})
        if not main:
            return {"rank": self.world.rank}
        save_adapter(self.model, self.run_dir / "adapter")
        self.logger.close()
        c = self.cfg
        plot_run(self.run_dir, f"{c.model.name} ({c.model.quant}, LoRA r={c.model.lora_rank}), {c.algo.name}")
        summary = write_summary(self.run_dir, self.cfg, history, self.data_reports)
        return summary

    def check_adapter(self, context: str) -> None:
        """A one-line error if a trained tensor (LoRA, and the norms where trained) holds a non-finite value.
        Gradients are checked before every optimizer step, so this means a corrupt optimizer state or memory:
        every later rollout and update would be non-finite too, and a checkpoint of it is worthless."""
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise QerlError(
                f"{context} {len(bad)} trained tensors hold non-finite values (first: {bad[0]}); stopped, no "
                f"checkpoint written: resume from the last one in {self.run_dir / 'checkpoints'} (--resume)"
            )

    def save(self, step: int) -> Path | None:
        """A checkpoint of this step, written by rank 0 with every rank's RNG state (None on the other ranks)."""
        self.check_adapter(f"before the checkpoint of step {step}:")
        rngs = self.world.gather(rng_state(self.gen))
        if not self.world.is_main:
            return None
        return save_checkpoint(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.gen,
            {"sampler": self.sampler.state()},
            self.norms,
            keep=self.cfg.train.keep_checkpoints,
            rng_states=rngs,
        )


def batch_metrics(ranks: list[dict]) -> dict:
    """Metrics of the whole step's batch from every rank's `rollout_record` (one record: one process):
    means over all completions, the slowest rank's rollout time, the largest peak memory."""
    cat = {k: [x for r in ranks for x in r[k]] for k in ("rewards", "correct", "lengths", "truncated")}
    out = {k: max(r[k] for r in ranks) for k in ("rollout_s", "peak_mem_gb")}
    if cat["rewards"]:
        rewards, lengths = torch.tensor(cat["rewards"]), cat["lengths"]
        out |= {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "accuracy": sum(cat["correct"]) / len(cat["correct"]),
            "completion_len": sum(lengths) / len(lengths),
            "truncated_frac": sum(cat["truncated"]) / len(cat["truncated"]),
            "tokens_per_s": sum(lengths) / max(out["rollout_s"], 1e-9),
        }
    return out


def check_output_dir(run_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """The run directory can be made and written to, and a fresh run does not silently replace an earlier run's
    checkpoints (checked before the model loads, not at the first save)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise QerlError(f"config: train.output_dir {run_dir} is a file, not a directory")
    if resume and not run_dir.exists():  # nothing to continue: say so, and make no empty directory
        raise QerlError(f"--resume: {run_dir} does not exist (train.output_dir names the run to continue)")
    earlier = checkpoint_dirs(run_dir)
    if earlier and not resume and not overwrite:
        raise QerlError(
            f"{run_dir} holds an earlier run (checkpoints up to step {earlier[-1][0]}): --resume continues it, "
            "--overwrite starts over and deletes them, or choose another --output-dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise QerlError(f"config: train.output_dir {run_dir} cannot be written to ({e.strerror or e})") from None


def use_training_kernels(model) -> None:
    """The GPU training forward: each frozen Linear dequantizes in one kernel launch into a shared
    bf16 buffer and multiplies with cuBLAS (`torch.ops.qerl.nvfp4_matmul`, backward likewise),
    instead of the reference's elementwise dequantization; LoRA products run as bf16 GEMMs,
    as the rollout engine computes them (fp32 parameters, gradients and AdamW states)."""
    from .kernels import available

    fast = available()
    for q in quant_linears(model).values():
        q.lora_compute_dtype = model.dtype
        if fast and q.format.name in ("nvfp4", "mxfp4", "bf16"):
            q.backend = "triton"


def write_summary(run_dir: Path, cfg: Config, history: dict, data_reports: list[str]) -> dict:
    from .logger import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = list({r["step"]: r for r in rows if "reward_mean" in r}.values())  # each step once

    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    ev = [(r["step"], round(r["eval_accuracy"], 4)) for r in rows if "eval_accuracy" in r]
    summary = {
        "steps": len(steps),
        "eval": ev,
        "eval_start": ev[0][1] if ev else None,
        "eval_end": ev[-1][1] if ev else None,
        "reward_first5": mean([r["reward_mean"] for r in steps[:5]]),
        "reward_last5": mean([r["reward_mean"] for r in steps[-5:]]),
        "total_s": round(sum(r.get("step_s", 0) for r in steps), 1),
    }
    md = [
        f"# qerl run: {run_dir}",
        "",
        f"- model: `{cfg.model.name}` ({cfg.model.quant}, LoRA r={cfg.model.lora_rank}), algorithm: {cfg.algo.name}, AQN: {cfg.aqn.enabled}",
        f"- data: {'; '.join(data_reports)}",
        f"- steps: {summary['steps']}, training time {summary['total_s']:.0f} s",
        f"- held-out accuracy (sampled, T={cfg.train.eval_temperature}): "
        + ", ".join(f"step {s}: {a:.3f}" for s, a in ev),
        f"- mean reward, first 5 steps: {summary['reward_first5']}, last 5 steps: {summary['reward_last5']}",
        "",
        "![curves](curves.png)",
        "",
    ]
    (run_dir / "summary.md").write_text("\n".join(md))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
