"""`qerl compare` on a tiny random model: 1 step x 2 configurations x 1 seed, the skip on re-run, the report."""

import json
import re

import pytest
import yaml
from conftest import run_overrides

from qerl.compare import finished, load_experiment, main, run_experiment


def _experiment(tmp_path, tiny_llama):
    over = run_overrides(tiny_llama, tmp_path / "unused")
    over["train"] = {"max_steps": 1, "eval_limit": 2, "save_every": 0}
    spec = {
        "base": None,
        "seeds": [3],
        "overrides": over,
        "configs": {"bf16": {"model.quant": "bf16", "aqn.enabled": False}, "nvfp4_aqn": {"model": {"quant": "nvfp4"}}},
        "output_dir": str(tmp_path / "experiments"),
        "report": str(tmp_path / "docs" / "results.md"),
        "notes": "lr: one for all.",
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_trains_each_run_once_and_reports(tmp_path, tiny_llama, digit_reward, capsys):
    path = _experiment(tmp_path, tiny_llama)
    exp = load_experiment(path)
    assert exp.config("bf16", 3, tmp_path / "x").model.quant == "bf16"
    assert exp.config("bf16", 3, tmp_path / "x").aqn.enabled is False
    assert exp.config("nvfp4_aqn", 3, tmp_path / "x").optim.lr == 1e-2  # the shared overrides reach every config

    done = run_experiment(exp)
    assert done["trained"] == [("bf16", 3), ("nvfp4_aqn", 3)] and not done["failed"]
    for name in ("bf16", "nvfp4_aqn"):
        run = tmp_path / "experiments" / name / "seed3"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 1 and (run / "adapter").is_dir()
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == 3
        kept = tmp_path / "docs" / "results" / name / "seed3"
        assert sorted(p.name for p in kept.iterdir()) == [
            "config.json",
            "eval",
            "metrics.jsonl",
            "run.json",
            "summary.json",
        ]
        assert sorted(p.name for p in (kept / "eval").iterdir()) == ["step-0.summary.json", "step-1.summary.json"]
    out = capsys.readouterr().out
    assert out.count(": started in ") == 2 and out.count(": finished in ") == 2

    # re-run: nothing trains again (no file of a run changes), both are skipped
    files = sorted((tmp_path / "experiments").rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    done = main(str(path))
    assert done["skipped"] == [("bf16", 3), ("nvfp4_aqn", 3)] and not done["trained"]
    assert sorted((tmp_path / "experiments").rglob("*")) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert capsys.readouterr().out.count(": skipped, finished") == 2

    # the report: a row per configuration with its seeds, one PNG each, the command; --report-only rebuilds it
    report = tmp_path / "docs" / "results.md"
    report.unlink()
    main(str(path), report_only=True)
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| bf16", "| nvfp4_aqn"]
    assert all(" | 1/1 (3) | " in r for r in rows)
    assert f"qerl compare {path} --report-only" in text and "lr: one for all." in text
    for name in ("bf16", "nvfp4_aqn", "overview"):
        png = tmp_path / "docs" / "results" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"](results/{name}.png)" in text

    # a changed configuration is not finished: it trains again
    spec = yaml.safe_load(path.read_text())
    spec["configs"]["bf16"]["optim.lr"] = 5e-3
    path.write_text(yaml.safe_dump(spec))
    exp = load_experiment(path)
    done = run_experiment(exp)
    assert done["trained"] == [("bf16", 3)] and done["skipped"] == [("nvfp4_aqn", 3)]
    assert "its config differs (optim.lr: 0.01 -> 0.005)" in capsys.readouterr().out

    # where and how a run was kept does not count: the same run trained by `qerl train` (overwrite off, another
    # output directory), its files copied in, is finished
    kept = exp.kept_dir("bf16", 3)
    saved = json.loads((kept / "config.json").read_text())
    saved["train"].update(overwrite=not saved["train"]["overwrite"], output_dir="runs/elsewhere")
    (kept / "config.json").write_text(json.dumps(saved))
    assert finished(kept, exp.config("bf16", 3, exp.run_dir("bf16", 3))) is None


def test_compare_resumes_a_run_cut_short(tmp_path, tiny_llama, digit_reward, capsys):
    """A sweep killed mid-run: the next one continues that run from its checkpoint instead of starting afresh."""
    from qerl.trainer import Trainer

    path = _experiment(tmp_path, tiny_llama)
    spec = yaml.safe_load(path.read_text())
    spec["overrides"]["train"] = {"max_steps": 2, "eval_limit": 2, "save_every": 1}
    spec["configs"] = {"bf16": spec["configs"]["bf16"]}
    path.write_text(yaml.safe_dump(spec))
    exp = load_experiment(path)
    run = exp.run_dir("bf16", 3)
    assert Trainer(exp.config("bf16", 3, run), progress=False).train(until=1) == {"stopped_at": 1}
    done = run_experiment(exp)
    assert done["trained"] == [("bf16", 3)]
    assert ": resumed at step 1 in " in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2]
    assert json.loads((exp.kept_dir("bf16", 3) / "run.json").read_text())["resumed_at_step"] == 1


@pytest.mark.parametrize(
    "text,message",
    [
        ("configs: {a: {}}\noutput_dir: 5\n", "'output_dir' must be a path, got 5"),
        ("configs: {a: {}}\nreport: [1]\n", "'report' must be a path"),
        ("configs: {a: {}}\nbogus: 1\n", "(not 'bogus')"),
    ],
)
def test_a_malformed_experiment_file_is_a_one_line_error(tmp_path, text, message):
    from qerl.compare import load_experiment
    from qerl.errors import QerlError

    f = tmp_path / "e.yaml"
    f.write_text(text)
    with pytest.raises(QerlError, match=re.escape(message)):
        load_experiment(f)


def test_an_experiment_file_with_a_key_written_twice_is_a_one_line_error(tmp_path):
    from qerl.errors import QerlError

    f = tmp_path / "e.yaml"
    f.write_text("configs: {a: {}}\nseeds: [0]\nseeds: [1]\n")
    with pytest.raises(QerlError, match=re.escape("invalid YAML (key 'seeds' appears twice (line 3))")):
        load_experiment(f)
