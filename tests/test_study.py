"""The study runner (benchmarks/study.py): its scores on hand-computed cases, and a ``--quick``
study end to end: every arm trained and scored, a well-formed report, resumable."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "study.py"
spec = importlib.util.spec_from_file_location("study", STUDY_PATH)
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # dataclasses look their module up there
spec.loader.exec_module(study)


def test_segmentation_miou_counts_background_and_skips_absent_classes():
    truth = np.array([0, 0, 1, 2, 2, 2])  # class 2 is background here
    predicted = np.array([0, 1, 1, 2, 2, 0])
    # class 0: 1 / 3, class 1: 1 / 2, class 2: 2 / 3; class 3 absent from both
    expected = (1 / 3 + 1 / 2 + 2 / 3) / 3
    assert study.segmentation_miou(predicted, truth, 4) == pytest.approx(expected)


def test_paired_difference_and_its_interval():
    mean, half = study.paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    # differences 0.1, 0.2, 0.3: sd 0.1, t(2) = 4.303
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert study.paired([0.5], [0.25]) == (0.25, None)


def test_linear_probe_separates_separable_tokens():
    rng = np.random.default_rng(0)
    import torch

    truth = rng.integers(-1, 3, size=(40, 16))
    centres = torch.randn(4, 8) * 5
    tokens = centres[torch.from_numpy(np.where(truth < 0, 3, truth))] + torch.randn(40, 16, 8)
    predicted = study.linear_probe(tokens, truth, tokens, num_classes=3)
    assert (predicted == np.where(truth < 0, 3, truth)).mean() > 0.95


@pytest.mark.slow
def test_quick_study_runs_every_arm_and_writes_a_report(tmp_path: Path):
    report = tmp_path / "docs" / "study.md"
    assert study.main(["--dir", str(tmp_path / "work"), "--quick", "--report", str(report)]) == 0
    text = report.read_text()
    for arm in study.ARMS:
        assert f"| {arm.title} |" in text
    runs = sorted((tmp_path / "work" / "runs").glob("*.json"))
    assert {json.loads(r.read_text())["arm"] for r in runs} == {a.name for a in study.ARMS}
    for run in runs:
        metrics = json.loads(run.read_text())["test"]
        for key, _, _ in study.METRICS:
            assert key in metrics
        assert 0 <= metrics["top1"] <= 1 and 0 <= metrics["position_share"] <= 1
    images = report.parent / "images"
    for figure in ("study-accuracy.png", "study-dense.png", "study-artifacts.png"):
        assert (images / figure).stat().st_size > 1000 and f"(images/{figure})" in text
    assert len(list(images.glob("token-label-*.png"))) == 1

    # Run again: nothing is trained twice, and prose written into the report is kept.
    report.write_text(text.replace("(What the figures say goes here.)", "Token labels helped."))
    mtimes = {r: r.stat().st_mtime for r in runs}
    assert study.main(["--dir", str(tmp_path / "work"), "--quick", "--report", str(report)]) == 0
    assert {r: r.stat().st_mtime for r in runs} == mtimes
    assert "Token labels helped." in report.read_text()
