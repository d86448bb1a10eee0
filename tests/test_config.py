"""Config validation: every field's range is checked at load with a one-line error naming the key;
`qerl config` lists every key; `qerl --version`."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qerl.cli import app
from qerl.config import RANGES, describe, load_config, settings
from qerl.errors import QerlError


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("rollout.temperature", -1, "rollout.temperature must be > 0, got -1"),
        ("rollout.temperature", 0, "rollout.temperature must be > 0, got 0"),
        ("rollout.top_p", 0, "rollout.top_p must be in (0, 1], got 0"),
        ("rollout.top_p", 1.5, "rollout.top_p must be in (0, 1], got 1.5"),
        ("rollout.top_k", -1, "rollout.top_k must be >= 0 (0: off), got -1"),
        ("rollout.prompts_per_step", 0, "rollout.prompts_per_step must be >= 1"),
        ("rollout.max_new_tokens", 0, "rollout.max_new_tokens must be >= 1"),
        ("train.eval_limit", 0, "train.eval_limit must be >= 1"),
        ("train.eval_limit", -3, "train.eval_limit must be >= 1"),
        ("train.eval_samples", 0, "train.eval_samples must be >= 1"),
        ("train.eval_every", -5, "train.eval_every must be >= 0"),
        ("train.save_every", -1, "train.save_every must be >= 0"),
        ("train.keep_checkpoints", -1, "train.keep_checkpoints must be >= 0"),
        ("train.max_steps", 0, "train.max_steps must be >= 1"),
        ("train.eval_temperature", -0.5, "train.eval_temperature must be >= 0"),
        ("train.seed", -1, "train.seed must be >= 0"),
        ("model.lora_rank", 0, "model.lora_rank must be >= 1, got 0"),
        ("model.lora_alpha", 0, "model.lora_alpha must be > 0, got 0"),
        ("model.lora_dropout", 1, "model.lora_dropout must be in [0, 1)"),
        ("model.device", "tpu", "model.device must be cpu, cuda or cuda:N"),
        ("model.dtype", "fp8", "model.dtype must be one of"),
        ("model.quant", "int3", "model.quant must be one of"),
        ("optim.lr", "nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr", "inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr", 0, "optim.lr must be > 0, got 0"),
        ("optim.warmup_ratio", -1, "optim.warmup_ratio must be in [0, 1], got -1"),
        ("optim.min_lr_ratio", 2, "optim.min_lr_ratio must be in [0, 1]"),
        ("optim.max_grad_norm", -1, "optim.max_grad_norm must be > 0, got -1"),
        ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0"),
        ("optim.betas", "0.9,1.5", "optim.betas must be two numbers in [0, 1)"),
        ("optim.micro_batch_size", 0, "optim.micro_batch_size must be >= 1"),
        ("algo.num_iterations", 0, "algo.num_iterations must be >= 1"),
        ("algo.max_sampling_rounds", 0, "algo.max_sampling_rounds must be >= 1"),
        ("algo.kl_beta", -1, "algo.kl_beta must be >= 0"),
        ("algo.eps_high", -0.1, "algo.eps_high must be >= 0"),
        ("algo.is_threshold", 0, "algo.is_threshold must be > 0"),
        ("algo.name", "ppo", "algo.name must be one of grpo, dapo, drgrpo, got 'ppo'"),
        ("aqn.sigma_start", 0, "aqn.sigma_start must be > 0"),
        ("aqn.num_stages", 2, "aqn.num_stages must be >= 3"),
        ("reward.overlong_buffer", -1, "reward.overlong_buffer must be >= 0"),
        ("reward.verify_timeout", 0, "reward.verify_timeout must be > 0"),
        ("reward.correct", "nan", "reward.correct must be a finite number"),
    ],
)
def test_out_of_range_values_are_one_line_errors_naming_the_key(key, value, message):
    section, name = key.split(".")
    with pytest.raises(QerlError) as info:
        load_config(None, [f"--{key}", str(value)])
    text = str(info.value)
    assert text.startswith(f"config: {key}") and message in text and "\n" not in text, text
    load_config(None, {section: {}})  # the defaults themselves pass


@pytest.mark.parametrize(
    "key,value,want",
    [
        ("rollout.top_k", "0", 0),
        ("rollout.top_p", "1", 1.0),
        ("train.eval_every", "0", 0),
        ("train.save_every", "0", 0),
        ("train.eval_limit", "none", None),
        ("train.eval_temperature", "0", 0.0),
        ("model.device", "cuda:1", "cuda:1"),
        ("optim.warmup_ratio", "0", 0.0),
    ],
)
def test_edge_values_that_mean_something_are_accepted(key, value, want):
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"--{key}", value]), section), name) == want


def test_every_numeric_field_has_a_range():
    numeric = {k for k, v, tp in settings(load_config()) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric -= {"reward.correct", "reward.format", "reward.overlong"}  # weights: any finite number
    assert numeric <= set(RANGES), numeric - set(RANGES)


def test_qerl_config_lists_every_key_with_type_value_and_range():
    cfg = load_config(None, ["--rollout.top_p", "0.9"])
    lines = describe(cfg).splitlines()[::2]  # each key's line; what it does is on the next
    assert [line.split()[0] for line in lines] == [k for k, _, _ in settings(cfg)]
    top_p = next(line for line in lines if line.startswith("rollout.top_p "))
    assert top_p.split() == ["rollout.top_p", "float", "0.9", "in", "(0,", "1]"]
    r = CliRunner().invoke(app, ["config", "--train.max_steps", "7"])
    assert r.exit_code == 0 and "train.max_steps" in r.output and " 7 " in r.output, r.output


def test_version():
    import qerl

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"qerl {qerl.__version__}"


def test_auto_dtype_is_bf16_on_gpus_and_fp32_on_every_cpu(monkeypatch):
    """`model.dtype: auto` computes in fp32 on CPUs, also on those with bf16 matrix units (the default's seeds
    drifted apart in bf16 there), and in bf16 on CUDA; names resolve as written; a bad name is one error."""
    from qerl.utils import resolve_dtype

    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("float32", "cuda") is torch.float32
    with pytest.raises(QerlError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_naming_the_default_algorithm_keeps_the_default_run_and_another_gets_its_own_settings():
    default = load_config()
    assert default.algo.name == "grpo" and default.algo.aggregation == "constant"
    assert load_config(None, ["--algo.name", "grpo"]).algo == default.algo
    dapo = load_config(None, ["--algo.name", "dapo"]).algo.resolved()
    assert (dapo.aggregation, dapo.eps_high, dapo.dynamic_sampling) == ("token_mean", 0.28, True)
    assert load_config(None, ["--algo.name", "drgrpo"]).algo.resolved().normalize_std is False


def test_every_key_says_what_it_does_and_docs_config_md_is_qerl_config_markdown():
    from qerl.config import HELP, choices

    cfg = load_config()
    keys = [k for k, _, _ in settings(cfg)]
    assert sorted(HELP) == sorted(keys) and all(HELP[k].strip() for k in keys)
    lines = describe(cfg).splitlines()
    assert [line.split()[0] for line in lines[::2]] == keys and lines[1::2] == [f"    {HELP[k]}" for k in keys]
    quant = lines[2 * keys.index("model.quant")]
    assert quant.split()[-7:] == ["nvfp4", "|", "mxfp4", "|", "nf4", "|", "bf16"] and choices("model.quant")
    # an algo key left none shows what the algorithm fills in, and the file documents exactly this table
    assert "none: 0.28 (dapo)" in describe(load_config(None, ["--algo.name", "dapo"]))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert doc.endswith(describe(cfg, markdown=True) + "\n"), "docs/config.md is stale: regenerate it"
    r = CliRunner().invoke(app, ["config", "--markdown"])
    assert r.exit_code == 0 and r.output == describe(cfg, markdown=True) + "\n"


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 1e3\noptim:\n  lr: 5e-4\n")  # YAML 1.1 reads both as strings
    cfg = load_config(f)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int) and cfg.optim.lr == 5e-4
    with pytest.raises(QerlError, match="train.max_steps: expected int, got '1.5e0x'"):
        load_config(None, ["--train.max_steps", "1.5e0x"])


def test_a_key_written_twice_is_an_error_and_list_items_may_hold_commas(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 3\n  max_steps: 5\n")
    with pytest.raises(QerlError, match=r"invalid YAML \(key 'max_steps' appears twice \(line 3\)\)"):
        load_config(f)
    assert load_config(None, ["--rollout.stop", '["a,b", "</s>"]']).rollout.stop == ["a,b", "</s>"]
    assert load_config(None, ["--rollout.stop", "x,y"]).rollout.stop == ["x", "y"]
    with pytest.raises(QerlError, match="rollout.stop: not a valid list"):
        load_config(None, ["--rollout.stop", "[a,"])
