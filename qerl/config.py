"""Typed run configuration: dataclasses, validated at load, YAML files plus CLI overrides.

`load_config(path, overrides)` merges the embedded defaults, an optional YAML file and
`--section.key value` overrides (in that order). An unknown key or a value of the wrong
type is a one-line QerlError naming the key. The algorithm (GRPO, DAPO, Dr.GRPO) is
chosen once here: `AlgoConfig.resolved()` fills the settings it implies (advantage
normalization, clip range, loss aggregation, dynamic sampling, overlong handling),
and the trainer reads only those settings, never the algorithm's name.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QerlError
from .noise import SCHEDULES, AQNConfig
from .rewards import ANSWER_METHODS, RewardConfig


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # HF dir, hub id, .gguf file, or the embedded default
    quant: str = "nvfp4"  # nvfp4 | mxfp4 | nf4 | bf16
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # compute dtype: auto (bf16 on GPUs, fp32 on CPUs) | bfloat16 | float32
    # auto: on a GPU, as few layers as each micro-batch's activations need (none when they fit); off on CPU
    gradient_checkpointing: str = "auto"  # auto | on | off (true/false are on/off)
    train_norms: bool = False  # the released QeRL scripts also trained the RMSNorm weights


@dataclass
class DataConfig:
    train: str = "arithmetic:1"  # file, directory, hub name, or arithmetic[:difficulty]
    eval: str = "arithmetic:1"
    train_split: str = "train"
    eval_split: str = "test"
    question_key: str | None = None
    answer_key: str | None = None
    system_prompt: str | None = None  # None: the chat template's own default
    suffix: str | None = None  # instruction appended to each question
    chat_template: bool = True
    train_limit: int | None = None


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    backend: str = "auto"  # auto: the CUDA-graph engine on a GPU when it supports the model | cuda | reference


ALGORITHMS = {
    # name: the settings it implies (explicit values in the config win)
    "grpo": dict(
        normalize_std=True, aggregation="seq_mean", eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong="none"
    ),
    "dapo": dict(
        normalize_std=True,
        aggregation="token_mean",
        eps_low=0.2,
        eps_high=0.28,
        dynamic_sampling=True,
        overlong="penalty",
    ),
    "drgrpo": dict(
        normalize_std=False, aggregation="constant", eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong="none"
    ),
}


@dataclass
class AlgoConfig:
    name: str = "grpo"  # grpo | dapo | drgrpo
    normalize_std: bool | None = None
    aggregation: str | None = None  # token_mean | seq_mean | constant
    eps_low: float | None = None
    eps_high: float | None = None
    dynamic_sampling: bool | None = None
    max_sampling_rounds: int = 3  # DAPO: cap on rounds used to fill a batch with informative groups
    overlong: str | None = None  # none | penalty | mask
    kl_beta: float = 0.0  # > 0: k3 KL to the base (adapter disabled); QeRL used 0
    num_iterations: int = 1  # updates per rollout batch (PPO epochs)
    is_level: str = "token"  # rollout-vs-train importance correction: token | sequence | geometric
    is_mode: str = "truncate"  # truncate | mask | none
    is_threshold: float = 2.0

    def resolved(self) -> AlgoConfig:
        if self.name not in ALGORITHMS:
            raise QerlError(f"config: algo.name must be one of {', '.join(ALGORITHMS)}, got {self.name!r}")
        preset = {k: v for k, v in ALGORITHMS[self.name].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **preset)
        for key in ("aggregation", "overlong", "is_level", "is_mode"):
            _choice(f"algo.{key}", getattr(out, key), CHOICES[f"algo.{key}"])
        return out


@dataclass
class OptimConfig:
    lr: float = 1e-5  # paper: 1e-5 for NVFP4/QLoRA LoRA, 5e-6 for bf16 LoRA
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 0.2
    micro_batch_size: int = 8  # sequences per forward/backward


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 0
    output_dir: str = "runs/qerl"
    eval_every: int = 0  # 0: only at the start and the end
    eval_limit: int | None = 100  # none: the whole eval set
    eval_samples: int = 1
    eval_temperature: float = 1.0
    save_every: int = 50
    keep_checkpoints: int = 2
    wandb: bool = False
    resume: bool = False
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in output_dir


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aqn: AQNConfig = field(default_factory=AQNConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The embedded default run (what `qerl train` runs with no config; written out in
# configs/default.yaml): SmolLM2-135M-Instruct, NVFP4 + LoRA + AQN, GRPO on generated
# single-digit addition word problems, sized to learn within 15 minutes on 2 CPU cores.
# A high LoRA learning rate and short completions are what make that budget enough; the
# dataclass defaults above stay those of a real run on a real model. The loss sums each
# completion's tokens over a constant (Dr.GRPO's aggregation) instead of GRPO's per-completion
# mean, whose 1/length lets long wrong answers off lightly: with it, some seeds' completions grew
# into the 40-token limit and stalled (README: seeds 0 and 2 went from 24.5% and 29.0% to 55.0%
# and 48.0%). Rollouts (and the held-out eval) sample at temperature 0.7: at 1.0 the 135M base answers 3% of
# the problems and half its completions run into the 40-token limit, so whether a seed's first groups carry
# any reward signal was luck (three seeds 49-82% held-out); at 0.7 the base answers 11.5% and the seeds end
# within 9 points (README).
DEFAULT_OVERRIDES: dict = {
    "data": {"suffix": "Give the final answer as a number at the end."},
    "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 40, "temperature": 0.7},
    "algo": {"aggregation": "constant"},
    "optim": {"lr": 5e-4, "micro_batch_size": 16, "max_grad_norm": 1.0, "weight_decay": 0.0},
    "train": {
        "max_steps": 24,
        "eval_every": 12,
        "eval_limit": 200,
        "eval_temperature": 0.7,
        "save_every": 8,
        "output_dir": "runs/default",
    },
}


# --- parsing and validation ----------------------------------------------------------------------
def choices(key: str) -> tuple[str, ...] | None:
    """The named values `key` takes (None: it takes any value of its type)."""
    if key == "model.quant":
        from .quant import FORMATS

        return tuple(FORMATS)
    return CHOICES.get(key)


def _choice(key, value, options):
    if value not in options:
        raise QerlError(f"config: {key} must be one of {', '.join(options)}, got {value!r}")


def _coerce(key: str, value, tp):
    """Convert a YAML/CLI value to the annotated type, or raise a one-line error naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str) and value.lstrip().startswith("["):  # a YAML list: items may hold commas
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise QerlError(f"config: {key}: not a valid list: {value!r}") from None
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise QerlError(f"config: {key}: expected a list, got {value!r}")
        items = [_coerce(key, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise QerlError(f"config: {key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise QerlError(f"config: {key}: expected {tp.__name__}, got {value!r}")
        try:
            out = value
            if isinstance(value, str):  # YAML reads 1e3 (no dot) as a string: take it as the number it writes
                out = float(value) if tp is int and not re.fullmatch(r"\s*[-+]?\d+\s*", value) else tp(value)
            if tp is int and isinstance(out, float) and out.is_integer():
                out = int(out)
            if not isinstance(out, (int, float)) or (tp is int and not isinstance(out, int)):
                raise ValueError
            return tp(out)
        except ValueError:
            raise QerlError(f"config: {key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise QerlError(f"config: {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise QerlError(
                f"unknown config key '{key}'"
                + (
                    f"; {prefix.rstrip('.')} has: {', '.join(sorted(names))}"
                    if prefix
                    else f"; sections: {', '.join(sorted(names))}"
                )
            )
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise QerlError(f"config: {key}: expected a mapping of settings, got {v!r}")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _set_path(data: dict, dotted: str, value):
    parts = dotted.split(".")
    d = data
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise QerlError(f"config override '{dotted}' conflicts with a value at '{p}'")
    d[parts[-1]] = value


# Short flags every config accepts.
ALIASES = {
    "max_steps": "train.max_steps",
    "output_dir": "train.output_dir",
    "resume": "train.resume",
    "overwrite": "train.overwrite",
    "seed": "train.seed",
    "model": "model.name",
    "quant": "model.quant",
    "device": "model.device",
}


def parse_overrides(args: list[str]) -> dict:
    """`--a.b value`, `--a.b=value` or `a.b=value` tokens -> nested dict (values still strings)."""
    out: dict = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" in tok:
                k, v = tok.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                k, v = tok, args[i + 1]
                i += 1
            else:
                k, v = tok, "true"  # a bare flag
        elif "=" in tok:
            k, v = tok.split("=", 1)
        else:
            raise QerlError(f"cannot parse override '{tok}': use --section.key value")
        k = k.replace("-", "_")
        _set_path(out, ALIASES.get(k, k), v)
        i += 1
    return out


def read_yaml(path: Path):
    """A YAML file's contents, as `yaml.safe_load` reads them except that a key written twice in one mapping is
    a `yaml.YAMLError` (YAML keeps the last, silently). Config and experiment files are read with it."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.YAMLError(f"key '{key}' appears twice (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    import yaml

    cfg = Config()
    if overrides is not None and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    if path is None:
        # the embedded default's algo settings are for its GRPO: another algorithm picked by name on the
        # command line gets that algorithm's own settings (naming GRPO itself keeps the default's)
        algo = (overrides or {}).get("algo")
        named = algo.get("name", cfg.algo.name) if isinstance(algo, dict) else cfg.algo.name
        other_algo = named != cfg.algo.name
        _apply(cfg, {k: v for k, v in DEFAULT_OVERRIDES.items() if not (k == "algo" and other_algo)})
    else:
        p = Path(path)
        if not p.is_file():
            raise QerlError(f"config file not found: {p}" + (" (a directory)" if p.is_dir() else ""))
        try:
            data = read_yaml(p) or {}
        except yaml.YAMLError as e:
            raise QerlError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise QerlError(f"{p}: the top level must be a mapping of sections")
        _apply(cfg, data)
    if overrides:
        _apply(cfg, overrides)
    validate(cfg)
    return cfg


# Every numeric field's valid values: (test, what the message says). None (where the type allows it)
# is always accepted; float fields must also be finite. Checked at load, before any model loads.
_POSITIVE = (lambda v: v > 0, "> 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
RANGES = {
    "model.lora_rank": _AT_LEAST_1,
    "model.lora_alpha": _POSITIVE,
    "model.lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.train_limit": (_AT_LEAST_1[0], ">= 1 (or none: all)"),
    "rollout.prompts_per_step": _AT_LEAST_1,
    "rollout.group_size": _AT_LEAST_1,
    "rollout.temperature": _POSITIVE,  # the policy's own temperature: greedy is train.eval_temperature 0
    "rollout.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.top_k": (_NON_NEGATIVE[0], ">= 0 (0: off)"),
    "rollout.max_new_tokens": _AT_LEAST_1,
    "algo.eps_low": _NON_NEGATIVE,
    "algo.eps_high": _NON_NEGATIVE,
    "algo.max_sampling_rounds": _AT_LEAST_1,
    "algo.kl_beta": _NON_NEGATIVE,
    "algo.num_iterations": _AT_LEAST_1,
    "algo.is_threshold": _POSITIVE,
    "optim.lr": _POSITIVE,
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.warmup_ratio": _UNIT,
    "optim.min_lr_ratio": _UNIT,
    "optim.max_grad_norm": _POSITIVE,
    "optim.micro_batch_size": _AT_LEAST_1,
    "train.max_steps": _AT_LEAST_1,
    "train.seed": _NON_NEGATIVE,
    "train.eval_every": (_NON_NEGATIVE[0], ">= 0 (0: only at the start and the end)"),
    "train.eval_limit": (_AT_LEAST_1[0], ">= 1 (or none: all)"),
    "train.eval_samples": _AT_LEAST_1,
    "train.eval_temperature": (_NON_NEGATIVE[0], ">= 0 (0: greedy)"),
    "train.save_every": (_NON_NEGATIVE[0], ">= 0 (0: only at the end)"),
    "train.keep_checkpoints": (_NON_NEGATIVE[0], ">= 0 (0: keep all)"),
    "aqn.sigma_start": _POSITIVE,
    "aqn.sigma_end": _POSITIVE,
    "aqn.num_stages": (lambda v: v >= 3, ">= 3"),
    "reward.overlong_buffer": _NON_NEGATIVE,
    "reward.verify_timeout": _POSITIVE,
}
DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16")

# The named values of every setting that takes one (model.quant's: `choices`; reward.answer_order lists any of
# its names in order); listed by `qerl config`, checked at load (aqn and reward by their own dataclasses).
CHOICES = {
    "model.dtype": DTYPES,
    "model.gradient_checkpointing": ("auto", "on", "off"),
    "rollout.backend": ("auto", "cuda", "reference"),
    "algo.name": tuple(ALGORITHMS),
    "algo.aggregation": ("token_mean", "seq_mean", "constant"),
    "algo.overlong": ("none", "penalty", "mask"),
    "algo.is_level": ("token", "sequence", "geometric"),
    "algo.is_mode": ("truncate", "mask", "none"),
    "aqn.schedule": SCHEDULES,
    "reward.answer_order": ANSWER_METHODS,
}

# What each setting does, one line each (`qerl config`, docs/config.md; a test keeps every key here).
HELP = {
    "model.name": "base model: HF directory, hub id, .gguf file, or smollm2-135m-instruct (shipped)",
    "model.quant": "format of the frozen base weights (quantized on load)",
    "model.lora_rank": "LoRA rank r on q, k, v, o, gate, up, down",
    "model.lora_alpha": "LoRA scale numerator: the update is (alpha / r) B A",
    "model.lora_dropout": "dropout on the LoRA input in the update",
    "model.device": "cpu, cuda or cuda:N; none: cuda when there is one (under torchrun: the local rank's)",
    "model.dtype": "compute dtype; auto: bf16 on GPUs, fp32 on CPUs",
    "model.gradient_checkpointing": "auto: only the layers the memory needs (GPU), off on CPU",
    "model.train_norms": "also train the RMSNorm weights (the released QeRL scripts did)",
    "data.train": "training prompts: .jsonl/.json/.parquet file, directory, hub name, arithmetic[:1-4]",
    "data.eval": "held-out set, the same kinds as data.train",
    "data.train_split": "split of data.train (hub datasets and directories)",
    "data.eval_split": "split of data.eval",
    "data.question_key": "column holding the question; none: found by common names (question, problem, ...)",
    "data.answer_key": "column holding the gold answer; none: found by common names (answer, solution, ...)",
    "data.system_prompt": "system message of the chat prompt; none: the chat template's own",
    "data.suffix": "instruction appended to every question",
    "data.chat_template": "wrap prompts in the tokenizer's chat template (false: the raw question)",
    "data.train_limit": "use only the first N training records",
    "rollout.prompts_per_step": "prompts a step (a multiple of the number of ranks)",
    "rollout.group_size": "completions sampled a prompt (the group of the advantages)",
    "rollout.temperature": "sampling temperature; the update's log-probs use the same",
    "rollout.top_p": "nucleus sampling mass (1: off)",
    "rollout.top_k": "sample among the k most likely tokens (0: off)",
    "rollout.max_new_tokens": "completion length limit in tokens",
    "rollout.stop": 'strings that end a completion (besides EOS); command line: a,b or a YAML list ["a,b", c]',
    "rollout.backend": "auto: the CUDA-graph engine on a GPU when it supports the model, else reference",
    "algo.name": "the algorithm; it fills the algo keys left none",
    "algo.normalize_std": "divide group advantages by the group's std (Dr.GRPO: no)",
    "algo.aggregation": "token losses: batch token mean, mean per completion, or sum over a constant (Dr.GRPO)",
    "algo.eps_low": "PPO clip range below 1",
    "algo.eps_high": "PPO clip range above 1 (DAPO's clip-higher: 0.28)",
    "algo.dynamic_sampling": "drop groups whose rewards are all equal and sample more prompts (DAPO)",
    "algo.max_sampling_rounds": "dynamic sampling: at most this many sampling rounds a step",
    "algo.overlong": "truncated completions: none, penalty (reward.overlong ramp) or mask (no loss)",
    "algo.kl_beta": "k3 KL penalty to the base (adapter off); 0: none, as QeRL",
    "algo.num_iterations": "updates a rollout batch (PPO epochs)",
    "algo.is_level": "rollout-vs-update importance ratio per token, sequence, or geometric mean",
    "algo.is_mode": "ratios above is_threshold: truncated, masked, or no correction",
    "algo.is_threshold": "the importance ratio's cap",
    "optim.lr": "AdamW learning rate of the LoRA weights (peak, after warmup)",
    "optim.betas": "AdamW betas",
    "optim.weight_decay": "AdamW weight decay",
    "optim.warmup_ratio": "share of the steps warming the learning rate up linearly",
    "optim.min_lr_ratio": "cosine decay floor, a share of optim.lr",
    "optim.max_grad_norm": "gradient clipping norm",
    "optim.micro_batch_size": "completions a forward/backward (gradients accumulate over the step)",
    "aqn.enabled": "Adaptive Quantization Noise on the rollout policy's RMSNorm weights",
    "aqn.sigma_start": "noise std of the first noisy stage",
    "aqn.sigma_end": "noise std of the last stage",
    "aqn.num_stages": "stages of the schedule; stage 0 is noise-free",
    "aqn.schedule": "sigma from sigma_start to sigma_end: exp | linear | cosine | log",
    "reward.correct": "reward of a correct final answer",
    "reward.format": "reward of an answer given in the answer_tag or boxed form (reward.answer_order names)",
    "reward.overlong": "weight of DAPO's length penalty (0 to -1 over the last overlong_buffer tokens)",
    "reward.overlong_buffer": "tokens before max_new_tokens where the length penalty ramps",
    "reward.answer_order": "how the final answer is found, tried in order: boxed, answer_tag, hash, last_number",
    "reward.verify_timeout": "seconds for one math-verify comparison",
    "train.max_steps": "RL steps of the run",
    "train.seed": "seed of the prompt order, sampling, noise and LoRA initialization",
    "train.output_dir": "run directory: metrics, logs, plots, adapter, checkpoints",
    "train.eval_every": "held-out accuracy every N steps",
    "train.eval_limit": "held-out problems scored",
    "train.eval_samples": "samples a held-out problem (pass@1 averaged, maj@k)",
    "train.eval_temperature": "held-out sampling temperature",
    "train.save_every": "checkpoint every N steps",
    "train.keep_checkpoints": "checkpoints kept (the newest)",
    "train.wandb": "also log to Weights & Biases",
    "train.resume": "continue from the newest intact checkpoint in output_dir",
    "train.overwrite": "start over in an output_dir that holds an earlier run's checkpoints",
}


def settings(cfg: Config):
    """(section.key, value, type annotation) of every setting, in declaration order."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            yield f"{sec.name}.{f.name}", getattr(obj, f.name), hints[f.name]


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def validate(cfg: Config):
    for key, v, _tp in settings(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            raise QerlError(f"config: {key} must be a finite number, got {_show(v)}")
        if isinstance(v, list) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            raise QerlError(f"config: {key} must hold finite numbers, got {v}")
        if v is not None and key in RANGES and not RANGES[key][0](v):
            raise QerlError(f"config: {key} must be {RANGES[key][1]}, got {_show(v)}")
    cfg.algo.resolved()
    gc = str(cfg.model.gradient_checkpointing).lower()
    cfg.model.gradient_checkpointing = {"true": "on", "1": "on", "false": "off", "0": "off", "none": "auto"}.get(gc, gc)
    for key in ("model.gradient_checkpointing", "rollout.backend", "model.dtype", "model.quant"):
        section, name = key.split(".")
        _choice(key, getattr(getattr(cfg, section), name), choices(key))
    if cfg.model.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.model.device):
        raise QerlError(
            f"config: model.device must be cpu, cuda or cuda:N (or none: cuda when there is one), got {cfg.model.device!r}"
        )
    if cfg.rollout.group_size < 2 and cfg.algo.resolved().normalize_std:
        raise QerlError("config: rollout.group_size must be >= 2 for group advantages")
    for name, cls in (("aqn", AQNConfig), ("reward", RewardConfig)):  # their own dataclasses check the rest
        try:
            cls(**dataclasses.asdict(getattr(cfg, name)))
        except (ValueError, TypeError) as e:
            raise QerlError(f"config: {name}: {e}") from None


def describe(cfg: Config, markdown: bool = False) -> str:
    """Every setting (`qerl config`): `section.key  type  value  valid values`, and under it what the setting does;
    an algo key left none shows the value its algorithm fills in. `markdown`: one table (docs/config.md)."""

    def type_name(tp):
        return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")

    def value(v):
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if v is None or isinstance(v, bool):
            return {None: "none", True: "true", False: "false"}[v]
        return str(v) if isinstance(v, int) else repr(v)

    def cut(text, n=36):
        return text if len(text) <= n else text[: n - 3] + "..."

    def valid(key):
        named = choices(key)
        if named:
            return ("any of " if key == "reward.answer_order" else "") + " | ".join(named)
        return RANGES[key][1] if key in RANGES else ""

    filled = cfg.algo.resolved()
    rows = []
    for key, v, tp in settings(cfg):
        shown = value(v)
        section, name = key.split(".")
        if section == "algo" and v is None and name in ALGORITHMS[filled.name]:
            shown = f"none: {value(getattr(filled, name))} ({filled.name})"
        rows.append((key, type_name(tp), shown, valid(key), HELP.get(key, "")))
    if markdown:
        head = "| key | type | value | valid values | what it does |\n|---|---|---|---|---|\n"
        cells = ([f"`{key}`", *(c.replace("|", "\\|") for c in rest)] for key, *rest in rows)
        return head + "\n".join("| " + " | ".join(r) + " |" for r in cells)
    rows = [(key, tp, cut(shown), ok, what) for key, tp, shown, ok, what in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for key, tp, shown, ok, what in rows:
        lines.append(f"{key:<{widths[0]}}  {tp:<{widths[1]}}  {shown:<{widths[2]}}  {ok}".rstrip())
        lines.append(f"    {what}")
    return "\n".join(lines)
