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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QerlError
from .noise import AQNConfig
from .rewards import RewardConfig


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # HF dir, hub id, .gguf file, or the embedded default
    quant: str = "nvfp4"  # nvfp4 | mxfp4 | nf4 | bf16
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # compute dtype: auto (bf16 on GPUs and AMX/AVX512-BF16 CPUs, else fp32) | bfloat16 | float32
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
            raise QerlError(f"algo.name: unknown algorithm '{self.name}'; choose one of {', '.join(ALGORITHMS)}")
        preset = {k: v for k, v in ALGORITHMS[self.name].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **preset)
        _choice("algo.aggregation", out.aggregation, ("token_mean", "seq_mean", "constant"))
        _choice("algo.overlong", out.overlong, ("none", "penalty", "mask"))
        _choice("algo.is_level", out.is_level, ("token", "sequence", "geometric"))
        _choice("algo.is_mode", out.is_mode, ("truncate", "mask", "none"))
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
    eval_limit: int = 100
    eval_samples: int = 1
    eval_temperature: float = 1.0
    save_every: int = 50
    keep_checkpoints: int = 2
    wandb: bool = False
    resume: bool = False


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
# and 48.0%).
DEFAULT_OVERRIDES: dict = {
    "data": {"suffix": "Give the final answer as a number at the end."},
    "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 40},
    "algo": {"aggregation": "constant"},
    "optim": {"lr": 5e-4, "micro_batch_size": 16, "max_grad_norm": 1.0, "weight_decay": 0.0},
    "train": {"max_steps": 24, "eval_every": 12, "eval_limit": 200, "save_every": 8, "output_dir": "runs/default"},
}


# --- parsing and validation ----------------------------------------------------------------------
def _choice(key, value, options):
    if value not in options:
        raise QerlError(f"{key}: '{value}' is not one of {', '.join(options)}")


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
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise QerlError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(key, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise QerlError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise QerlError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value) if isinstance(value, str) else value
            if tp is int and isinstance(out, float) and out.is_integer():
                out = int(out)
            if not isinstance(out, (int, float)) or (tp is int and not isinstance(out, int)):
                raise ValueError
            return tp(out)
        except ValueError:
            raise QerlError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise QerlError(f"{key}: expected a string, got {value!r}")
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
                raise QerlError(f"{key}: expected a mapping of settings, got {v!r}")
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


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    import yaml

    cfg = Config()
    if overrides is not None and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    if path is None:
        # the embedded default's algo settings are for its GRPO: another algorithm picked by name on the
        # command line gets that algorithm's own settings
        picks_algo = "name" in (overrides or {}).get("algo", {})
        _apply(cfg, {k: v for k, v in DEFAULT_OVERRIDES.items() if not (k == "algo" and picks_algo)})
    else:
        p = Path(path)
        if not p.exists():
            raise QerlError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise QerlError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise QerlError(f"{p}: the top level must be a mapping of sections")
        _apply(cfg, data)
    if overrides:
        _apply(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    cfg.algo.resolved()
    gc = str(cfg.model.gradient_checkpointing).lower()
    cfg.model.gradient_checkpointing = {"true": "on", "1": "on", "false": "off", "0": "off", "none": "auto"}.get(gc, gc)
    _choice("model.gradient_checkpointing", cfg.model.gradient_checkpointing, ("auto", "on", "off"))
    _choice("rollout.backend", cfg.rollout.backend, ("auto", "cuda", "reference"))
    from .quant import FORMATS

    _choice("model.quant", cfg.model.quant, tuple(FORMATS))
    for key, v in (
        ("rollout.group_size", cfg.rollout.group_size),
        ("rollout.prompts_per_step", cfg.rollout.prompts_per_step),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("train.max_steps", cfg.train.max_steps),
        ("optim.micro_batch_size", cfg.optim.micro_batch_size),
        ("algo.num_iterations", cfg.algo.num_iterations),
    ):
        if v < 1:
            raise QerlError(f"{key} must be >= 1, got {v}")
    if cfg.rollout.group_size < 2 and cfg.algo.resolved().normalize_std:
        raise QerlError("rollout.group_size must be >= 2 for group advantages")
    if cfg.optim.lr <= 0:
        raise QerlError(f"optim.lr must be positive, got {cfg.optim.lr}")
    try:  # the helpers' own dataclasses validate their fields
        AQNConfig(**dataclasses.asdict(cfg.aqn))
        RewardConfig(**dataclasses.asdict(cfg.reward))
    except (ValueError, TypeError) as e:
        raise QerlError(str(e)) from None
