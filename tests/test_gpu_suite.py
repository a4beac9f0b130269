"""The GPU suite's dry run (``benchmarks/gpu_suite.py --device cpu --tiny``): every step of the
one call a GPU session gets runs here first, so that its minutes are not spent on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"

pytestmark = pytest.mark.slow


def test_the_dry_run_runs_every_step_and_writes_its_results(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SUITE), str(tmp_path / "out"), "--device", "cpu",
                           "--tiny"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["cuda_tests", "matmul", "label_f0", "label_f6", "train",
                           "shard_tasks", "label_f6_compiled"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert all("result" in s for name, s in steps.items() if name != "cuda_tests")
    assert steps["train"]["result"]["steps"]["token label --recipe lvvit"]["ratio"] > 0
    assert steps["train"]["result"]["loader"]["consumer"] == "token label --recipe lvvit"
    for name in ("label_f0", "label_f6"):  # the levers' figures, measured in the same run
        assert steps[name]["result"]["bare_unfolded"]["folded_speedup"] > 0
        assert steps[name]["result"]["decode"]["img_s"] > 0
    assert steps["label_f6_compiled"]["result"]["config"]["compile"] is True
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "CUDA tests: ok" in summary and "not measured (" not in summary
    assert "x the eager job" in summary and "folding the weight standardisation" in summary
    assert "==== shard_tasks" in (tmp_path / "out" / "log").read_text()


def test_a_step_left_without_budget_is_skipped_not_run(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SUITE), str(tmp_path), "--device", "cpu",
                           "--tiny", "--only", "matmul,train", "--budget-s", "18"],
                          capture_output=True, text=True, timeout=120)
    steps = json.loads((tmp_path / "results.json").read_text())["steps"]
    assert steps["matmul"]["status"] == "ok"
    assert steps["train"]["status"] == "skipped"  # needs 20 s; less than 18 s was left
    assert proc.returncode == 1  # not every step ran
    assert "train: not measured (skipped)" in (tmp_path / "summary.txt").read_text()


def test_the_labeling_steps_get_the_measured_matmul_rate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = suite  # dataclasses look their module up there
    spec.loader.exec_module(suite)
    (f6,) = [s for s in suite.steps_for("cuda", tiny=False) if s.name == "label_f6"]
    argv = suite.step_argv(f6, Path("/r/x.json"), 812.34)
    assert argv[argv.index("--peak-tflops") + 1] == "812.3" and "/r/x.json" in argv
    unmeasured = suite.step_argv(f6, Path("/r/x.json"), None)
    assert "--peak-tflops" not in unmeasured and "{matmul_tflops}" not in unmeasured
