"""`qerl eval` applies the adapter: it changes the score, and equals the merged model's score."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_checkpoint

from qerl.data import Record, build_prompt, load_records
from qerl.errors import QerlError
from qerl.evaluate import EvalSettings, evaluate, run_dir_of
from qerl.loading import load_model
from qerl.lora import lora_parameters, merge_lora, save_adapter
from qerl.rewards import extract_answer
from qerl.rollout import Engine, SamplingParams

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SETTINGS = EvalSettings(samples=1, temperature=0.0, max_new_tokens=12, system_prompt=None, suffix=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "qwen2", "qwen2", seed=11, std=0.3)


@pytest.fixture(scope="module")
def self_consistent_records(tiny):
    """Questions whose gold IS the base model's greedy answer, so the base scores 1.0."""
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=0, device="cpu")
    qs = [f"q{i}: {i * 7 % 13} + {i}?" for i in range(24)]
    texts = Engine(model, tok).generate(qs, GREEDY).texts
    recs = [Record(q, extract_answer(t), {}) for q, t in zip(qs, texts) if extract_answer(t) is not None]
    assert len(recs) >= 8
    return recs


def _adapter(tiny, out_dir):
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=4, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    save_adapter(model, out_dir)
    return model, tok


def test_base_scores_one_by_construction(tiny, self_consistent_records):
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=0, device="cpu")
    res = evaluate(Engine(model, tok), self_consistent_records, SETTINGS, progress=False)
    assert res["pass@1"] == 1.0


def test_cli_eval_applies_the_adapter_and_equals_the_merged_model(tiny, self_consistent_records, tmp_path):
    adapter = tmp_path / "adapter"
    model, tok = _adapter(tiny, adapter)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in self_consistent_records)
    )
    outs = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", str(adapter)])):
        out = tmp_path / f"{name}.jsonl"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "qerl.cli",
                "eval",
                "--model",
                str(tiny),
                "--dataset",
                str(data),
                "--split",
                "train",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--device",
                "cpu",
                "--output",
                str(out),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outs[name] = [json.loads(x) for x in out.read_text().splitlines()]
        summary = json.loads(out.with_suffix(".summary.json").read_text())
        assert summary["adapter"] == (str(adapter) if extra else None)
    base_acc = sum(r["correct"][0] for r in outs["base"]) / len(outs["base"])
    ad_acc = sum(r["correct"][0] for r in outs["adapter"]) / len(outs["adapter"])
    assert base_acc == 1.0 and ad_acc < 0.8, (base_acc, ad_acc)  # the adapter changed the answers

    # Same adapter merged into the weights (dequantize + (alpha/r) BA, kept in bf16).
    merge_lora(model, quant="bf16")
    merged = evaluate(Engine(model, tok), self_consistent_records, SETTINGS, progress=False)
    live = [r["completions"][0] for r in outs["adapter"]]
    got = Engine(model, tok).generate([r.question for r in self_consistent_records], GREEDY).texts
    same = sum(a == b for a, b in zip(live, got)) / len(live)
    assert same >= 0.9, same  # bf16 rounding of the merged weight may flip a rare near-tie
    assert abs(merged["pass@1"] - ad_acc) <= 1 / len(live) + 1e-9


def test_eval_on_gsm8k_rows_writes_every_field(tiny, tmp_path):
    if not GSM8K_TEST.exists():
        pytest.skip("shared GSM8K data not present")
    records, report = load_records(str(GSM8K_TEST), "test", limit=3)
    assert len(records) == 3 and "kept 3" in report.summary()
    model, tok = load_model(tiny, quant="nvfp4", lora_rank=0, device="cpu")
    res = evaluate(
        Engine(model, tok),
        records,
        EvalSettings(samples=2, temperature=1.0, max_new_tokens=8),
        tmp_path / "gsm8k.jsonl",
        progress=False,
    )
    rows = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and res["n"] == 3 and "maj@2" in res
    for r, rec in zip(rows, records):
        assert set(r) >= {"prompt", "completions", "extracted", "gold", "correct"} and len(r["completions"]) == 2
        assert r["gold"] == rec.answer and rec.answer.replace(",", "").lstrip("-").isdigit()
    assert res["pass@1"] == sum(sum(r["correct"]) / 2 for r in rows) / 3


def test_cli_compare_base_scores_both_under_the_same_settings(tiny, self_consistent_records, tmp_path, monkeypatch):
    """`qerl eval --adapter RUN/adapter --compare-base`: one call, the run's prompt settings for the base
    and the adapter alike, each pass equal to evaluating that model alone, the delta, and the files
    under the run's eval/ (nothing in the working directory)."""
    from typer.testing import CliRunner

    from qerl.cli import app

    run = tmp_path / "run"
    model, tok = _adapter(tiny, run / "adapter")
    prompt = {"system_prompt": "Reply with a number.", "suffix": " ="}
    (run / "config.json").write_text(json.dumps({"data": prompt}))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in self_consistent_records)
    )
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    args = ["eval", "--model", str(tiny), "--dataset", str(data), "--split", "train", "--limit", "10"]
    args += ["--max-new-tokens", "12", "--device", "cpu", "--adapter", str(run / "adapter"), "--compare-base"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "suffix=' ='" in r.output and "system_prompt='Reply with a number.'" in r.output and "limit=10" in r.output
    assert not (tmp_path / "cwd" / "eval").exists()
    out = run / "eval" / "qerl-eval-data-train.compare.json"
    assert str(out) in r.output
    res = json.loads(out.read_text())
    assert {k: res["settings"][k] for k in prompt} == prompt and res["limit"] == 10 and res["n"] == 10
    assert res["delta"] == {k: res["adapter"][k] - res["base"][k] for k in ("pass@1", "maj@1")}
    for name in ("base", "adapter"):
        assert f"{name:<8} pass@1={res[name]['pass@1']:.4f}" in r.output
    assert f"delta    pass@1={res['delta']['pass@1']:+.4f}" in r.output

    # Each pass is what evaluating that model alone under the same settings gives.
    rows = {k: [json.loads(x) for x in Path(res["files"][k]).read_text().splitlines()] for k in ("base", "adapter")}
    same = EvalSettings(samples=1, temperature=0.0, max_new_tokens=12, **prompt)
    base_model, _ = load_model(tiny, quant="nvfp4", lora_rank=0, device="cpu")
    for name, m in (("base", base_model), ("adapter", model)):
        want = evaluate(Engine(m, tok), self_consistent_records[:10], same, tmp_path / f"{name}.jsonl", progress=False)
        want_rows = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert res[name]["pass@1"] == want["pass@1"], name
        assert [x["completions"] for x in rows[name]] == [x["completions"] for x in want_rows], name
        prompts = [build_prompt(tok, rec.question, **prompt) for rec in self_consistent_records[:10]]
        assert [x["prompt"] for x in rows[name]] == prompts and " =" in prompts[0], name
    assert [x["completions"] for x in rows["base"]] != [x["completions"] for x in rows["adapter"]]

    # A checkpoint's adapter belongs to its run too; an adapter from elsewhere to no run.
    assert run_dir_of(run / "checkpoints" / "step-3" / "adapter") == run.resolve()
    assert run_dir_of(tmp_path / "cwd" / "adapter") is None
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny), "--compare-base"])
    assert isinstance(r.exception, QerlError) and "--adapter" in str(r.exception)


def test_cli_eval_takes_the_base_and_settings_of_the_adapters_run(tiny, self_consistent_records, tmp_path):
    """With no --model / --quant, a run's adapter is scored on that run's base and format, with its prompt
    template, sampling filters and answer order; an adapter from elsewhere on the base its PEFT config names;
    a directory that is no adapter is a one-line error before any model loads."""
    from typer.testing import CliRunner

    from qerl.cli import app

    run = tmp_path / "run"
    _, tok = _adapter(tiny, run / "adapter")
    cfg = {
        "model": {"name": str(tiny), "quant": "bf16"},
        "data": {"system_prompt": None, "suffix": " =", "chat_template": False},
        "rollout": {"top_p": 1.0, "top_k": 1, "stop": ["\n\n"]},
        "reward": {"answer_order": ["last_number"]},
    }
    (run / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in self_consistent_records)
    )
    common = ["--dataset", str(data), "--split", "train", "--limit", "4", "--max-new-tokens", "6", "--device", "cpu"]
    r = CliRunner().invoke(app, ["eval", *common, "--adapter", str(run / "adapter")])
    assert r.exit_code == 0, r.output
    assert f"model={tiny} quant=bf16" in r.output and "base, prompt and sampling settings from" in r.output
    res = json.loads((run / "eval" / "qerl-eval-data-train.summary.json").read_text())
    assert (res["model"], res["quant"]) == (str(tiny), "bf16")
    want = {"chat_template": False, "top_k": 1, "stop": ["\n\n"], "answer_order": ["last_number"], "suffix": " ="}
    assert {k: res["settings"][k] for k in want} == want
    rows = [json.loads(x) for x in (run / "eval" / "qerl-eval-data-train.jsonl").read_text().splitlines()]
    q = self_consistent_records[0].question
    assert rows[0]["prompt"] == build_prompt(tok, q, system_prompt=None, suffix=" =", chat_template=False)
    # the options given win
    r = CliRunner().invoke(app, ["eval", *common, "--adapter", str(run / "adapter"), "--quant", "nvfp4"])
    assert r.exit_code == 0 and "quant=nvfp4" in r.output, r.output

    elsewhere = tmp_path / "elsewhere"
    _adapter(tiny, elsewhere)
    base = json.loads((elsewhere / "adapter_config.json").read_text())["base_model_name_or_path"]
    r = CliRunner().invoke(app, ["eval", *common, "--adapter", str(elsewhere), "--output", str(tmp_path / "e.jsonl")])
    assert r.exit_code == 0 and f"model={base} quant=nvfp4" in r.output, r.output

    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["eval", *common, "--adapter", str(tmp_path / "empty")])
    assert isinstance(r.exception, QerlError) and "not a PEFT adapter directory" in str(r.exception)
    assert "applied" not in r.output


def test_cli_eval_rejects_bad_options_before_loading_and_takes_a_checkpoint_directory(tiny, tmp_path):
    from typer.testing import CliRunner

    from qerl.cli import app

    nowhere = ["eval", "--model", str(tmp_path / "no-such-model"), "--device", "cpu"]  # loading it would fail
    for option, value, message in [
        ("--samples", "0", "eval: samples must be >= 1"),
        ("--temperature", "-1", "eval: temperature must be >= 0"),
        ("--max-new-tokens", "0", "eval: max_new_tokens must be >= 1"),
        ("--limit", "0", "--limit must be >= 1"),
    ]:
        r = CliRunner().invoke(app, [*nowhere, option, value])
        assert isinstance(r.exception, QerlError) and message in str(r.exception), (option, r.output)
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    _adapter(tiny, ckpt / "adapter")
    args = ["eval", "--model", str(tiny), "--device", "cpu", "--limit", "2", "--max-new-tokens", "4"]
    r = CliRunner().invoke(app, [*args, "--adapter", str(ckpt), "--output", str(tmp_path / "e.jsonl")])
    assert r.exit_code == 0 and f"adapter {ckpt / 'adapter'}: applied" in r.output, r.output
