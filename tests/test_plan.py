"""The memory planner against the published model sizes (`docs/formats.md` section 4)."""

import os

import pytest

from qerl.config import load_config
from qerl.modeling import ModelArgs
from qerl.plan import GB, plan_memory


@pytest.mark.parametrize("name,nvfp4_gb,bf16_gb", [("qwen2.5-7b", 5.9, 15.2), ("qwen2.5-32b", 20.7, 65.5)])
def test_model_sizes_match_published(name, nvfp4_gb, bf16_gb):
    cfg = load_config(None, {"model": {"lora_rank": 16}})
    for quant, want in (("nvfp4", nvfp4_gb), ("bf16", bf16_gb)):
        c = plan_memory(ModelArgs.from_name(name), cfg, quant=quant).components
        size = (c[f"weights ({quant}, decoder Linears)"] + c["embeddings + lm_head (bf16)"]) / GB
        assert size == pytest.approx(want, rel=0.03), (quant, size)


def test_32b_fits_one_80gb_gpu_only_in_nvfp4():
    cfg = load_config(
        None,
        {
            "model": {"lora_rank": 32, "gradient_checkpointing": True},
            "rollout": {"prompts_per_step": 2, "group_size": 8, "max_new_tokens": 2048},
            "optim": {"micro_batch_size": 4},
        },
    )
    assert plan_memory(ModelArgs.from_name("qwen2.5-32b"), cfg, available_gb=80).fits is True
    assert plan_memory(ModelArgs.from_name("qwen2.5-32b"), cfg, available_gb=80, quant="bf16").fits is False


def test_bench_rejects_unknown_kernel_before_any_work():
    from qerl.bench import parse_without, run_rollout_bench
    from qerl.kernels.choice import LinearKernel

    with pytest.raises(ValueError, match="unknown kernel 'foo'.*known: mma_sync, wgmma, gemv, tc"):
        run_rollout_bench("qwen2.5-7b", without="wgmma+foo")
    with pytest.raises(ValueError, match="unknown kernel 'cublas'"):
        run_rollout_bench("qwen2.5-7b", without="wgmma,cublas")
    assert parse_without("wgmma, mma_sync+wgmma") == [
        {LinearKernel.WGMMA},
        {LinearKernel.MMA_SYNC, LinearKernel.WGMMA},
    ]


def test_bench_cli_help_names_every_kernel():
    """`qerl bench rollout --help` lists the kernels `--without` accepts (kept in step with LinearKernel)."""
    import inspect

    from qerl import cli
    from qerl.kernels.choice import LinearKernel

    help_text = inspect.signature(cli.bench_rollout).parameters["without"].default.help
    names = [k.value for k in LinearKernel if k is not LinearKernel.CUBLAS]
    assert help_text.endswith("kernels: " + ", ".join(names))


def test_plan_knows_hub_ids_offline_and_lists_the_known_models_for_an_unknown_one():
    from qerl.errors import QerlError
    from qerl.plan import plan_model_args

    assert plan_model_args("Qwen/Qwen2.5-7B-Instruct") == ModelArgs.from_name("qwen2.5-7b")
    with pytest.raises(QerlError, match=r"qwen2.5-70b: not a known model.*qwen2.5-7b \(Qwen/Qwen2.5-7B-Instruct\)"):
        plan_model_args("qwen2.5-70b")


def test_plan_says_what_it_assumed(monkeypatch):
    import torch
    from typer.testing import CliRunner

    from qerl.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    args = ["plan", "--model-config", "Qwen/Qwen2.5-7B-Instruct", "--rollout.group_size", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "rollout shape: 8 prompts x 4 completions, prompts up to 512 tokens" in r.output, r.output
    assert "no GPU visible and no --gpu-mem" in r.output and "fits" not in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--gpu-mem", "80"])
    assert "GPU memory: 80 GB (--gpu-mem)" in r.output and "-> fits" in r.output, r.output


def test_the_cli_grows_allocator_segments_unless_the_user_set_the_allocator(monkeypatch):
    import sys

    from qerl.cli import main

    for preset, expected in [(None, "expandable_segments:True"), ("max_split_size_mb:64", "max_split_size_mb:64")]:
        if preset is None:
            monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        else:
            monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset)
        monkeypatch.setattr(sys, "argv", ["qerl", "--help"])
        with pytest.raises(SystemExit):
            main()
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == expected


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--ranks", "0", "--ranks must be >= 1, got 0"),
        ("--gpu-mem", "0", "--gpu-mem must be > 0 GB, got 0"),
        ("--gpu-mem", "-5", "--gpu-mem must be > 0 GB"),
        ("--prompt-len", "-100", "--prompt-len must be >= 1"),
    ],
)
def test_plan_rejects_what_cannot_be_planned(option, value, message):
    from typer.testing import CliRunner

    from qerl.cli import app
    from qerl.errors import QerlError

    r = CliRunner().invoke(app, ["plan", "--model-config", "qwen2.5-7b", option, value])
    assert isinstance(r.exception, QerlError) and message in str(r.exception), r.output
