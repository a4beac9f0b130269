"""The quickstart, ``labeler demo``: labels that mean something, shown end to end on a CPU.

1. synthetic scenes with per-pixel ground truth (``labeler sample scenes``), registered;
2. a small NFNet teacher fitted to their classes (``labeler teacher fit``);
3. the scenes labeled with it (``labeler label``) and the store verified;
4. the labels scored against the masks (``labeler evaluate-labels``), with picture panels;
5. a small LV-ViT trained on the token labels and scored on the held-out split (``trainer
   train`` / ``trainer eval``, run as commands: the labeling service does not import the
   trainer).

Every step prints the command that does it alone, so a user can go on from there.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labeler_service.heatmap import render_panel
from labeler_service.labeling import LabelingOptions, label_dataset
from labeler_service.quality import describe_quality, evaluate_labels
from labeler_service.reports import echo_label_report, echo_verify_report
from labeler_service.scenes import SCENE_CLASSES, load_mask, make_scenes
from labeler_service.teacher_fit import FitOptions, fit_teacher, report_path_for
from storage import ImageStatus, Store
from storage.splits import held_out

DATASET = "scenes"


@dataclass(frozen=True)
class DemoConfig:
    """The quickstart's sizes: defaults run in about 8 minutes on 2 CPU cores (BENCHMARKS.md)."""

    images: int = 2500
    seed: int = 0
    val_permille: int = 200  # held out from the teacher and the student alike
    # Short budgets learn fastest from mild crops (BENCHMARKS.md (e)): most of the image.
    crop_scale: float = 0.8
    teacher: str = "test_nfnet"
    teacher_size: int = 96  # fit
    teacher_stride: int = 16  # dilated: a 6 x 6 grid at 96 px, 8 x 8 at 128
    teacher_epochs: int = 10
    # Labeling a little above the fit size: objects look as big as the fit's crops show them
    # (BENCHMARKS.md (e): 128 px beat 96 and 112 on distractor cells).
    label_size: int = 128
    topk: int = 5
    student: str = "lvvit_nano"
    student_size: int = 64  # 8 x 8 tokens
    student_epochs: int = 8
    student_lr: float = 0.03  # per 1024 images (the trainer's unit): 9.4e-4 at batch 32
    panels: int = 6
    workers: int = 1
    progress: bool = True


@dataclass
class LabeledScenes:
    """What :func:`make_labels` leaves: the scenes, the store, the label set, their figures."""

    images: Path
    store: Store
    labelset_id: str
    figures: dict


def run_demo(directory: Path, store_location: str, config: DemoConfig,
             echo: Callable[[str], None] = print) -> dict:
    """Run the quickstart into ``directory`` and the store; returns its figures."""
    directory = Path(directory)
    labeled = make_labels(directory, store_location, config, echo)
    store, images, figures = labeled.store, labeled.images, labeled.figures
    labelset = store.labelset(labeled.labelset_id)
    panels = write_panels(directory / "panels", store, labelset.id, images, config)
    echo(f"panels (image | ground truth | teacher top-1): {len(panels)} PNGs in "
         f"{panels[0].parent}" if panels else "panels: no held-out image to show")

    student = directory / "student"
    train = ["train", "--store", store_location, "--dataset", DATASET, "--labels", labelset.id,
             "--model", config.student, "--input-size", str(config.student_size), "--epochs",
             str(config.student_epochs), "--batch-size", "32", "--lr", str(config.student_lr),
             "--warmup-epochs", "1", "--crop-scale", str(config.crop_scale), "--val-permille",
             str(config.val_permille), "--workers", str(config.workers), "--seed",
             str(config.seed), "--out", str(student)]
    step(echo, f"student: {config.student} trained on the token labels for "
         f"{config.student_epochs} epochs", "trainer " + shlex.join(train))
    if not config.progress:
        train.append("--no-progress")
    trainer(train, capture=False)
    evaluate = ["eval", "--store", store_location, "--dataset", DATASET, "--labels",
                labelset.id, "--checkpoint", str(student / "last.pt"), "--val-permille",
                str(config.val_permille)]
    scores = json.loads(trainer(evaluate, capture=True).strip().splitlines()[-1])
    figures["student_heldout_top1"] = scores["top1"]
    echo(f"   $ trainer {shlex.join(evaluate)}\nstudent held-out top-1 {pct(scores['top1'])}, "
         f"top-5 {pct(scores['top5'])} ({scores['images']} images)")
    (directory / "demo.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def make_labels(directory: Path, store_location: str, config: DemoConfig,
                echo: Callable[[str], None] = print) -> LabeledScenes:
    """Steps 1-4: scenes made and registered, a teacher fitted, the scenes labeled and the
    labels scored against the masks. Run again into the same places, the scenes are made again
    (the same bytes), a teacher already fitted there is reused and labeled shards are kept."""
    directory = Path(directory)
    figures: dict = {}
    images = directory / "scenes"
    step(echo, f"scenes: {config.images} images of {len(SCENE_CLASSES)} classes, masks beside them",
         f"labeler sample scenes {images} --images {config.images} --seed {config.seed}")
    store = Store.open(store_location)
    make_scenes(images, images=config.images, seed=config.seed, store=store)
    dataset, created = store.add_dataset(DATASET, images)
    echo(f"{DATASET}: {'registered' if created else 'already registered'}: "
         f"{dataset.num_images} images, {len(dataset.class_names)} classes")

    teacher = directory / "teacher.safetensors"
    step(echo, f"teacher: {config.teacher} fitted to the scene classes at {config.teacher_size} px",
         f"labeler teacher fit {DATASET} --model {config.teacher} --input-size "
         f"{config.teacher_size} --output-stride {config.teacher_stride} --epochs "
         f"{config.teacher_epochs} --crop-scale {config.crop_scale} --val-permille "
         f"{config.val_permille} --out {teacher}")
    if not (teacher.is_file() and report_path_for(teacher).is_file()):
        fit_teacher(store, DATASET, config.teacher, teacher, FitOptions(
            input_size=config.teacher_size, epochs=config.teacher_epochs,
            output_stride=config.teacher_stride, crop_scale=(config.crop_scale, 1.0),
            val_permille=config.val_permille, workers=config.workers, seed=config.seed,
            progress=config.progress))
    else:
        echo(f"(a teacher is already fitted there: {teacher})")
    fit = json.loads(report_path_for(teacher).read_text())
    figures["teacher_heldout_top1"] = fit["heldout_top1"]
    echo(f"teacher held-out top-1 {pct(fit['heldout_top1'])}, top-5 {pct(fit['heldout_top5'])} "
         f"({fit['heldout_images']} images it never trained on; {fit['seconds']:.0f} s)")

    step(echo, f"labels: the teacher run densely at {config.label_size} px, top-{config.topk}",
         f"labeler label {DATASET} --model {config.teacher} --checkpoint {teacher} "
         f"--input-size {config.label_size} --topk {config.topk}")
    report = label_dataset(store, DATASET, config.teacher, teacher, config.label_size,
                           config.topk, LabelingOptions(batch_size=32, num_workers=config.workers,
                                                        progress=config.progress))
    echo_label_report(report, store, DATASET, echo)
    figures["agreement"] = report.agreement
    if not echo_verify_report(store, echo):
        raise RuntimeError("the store is not consistent after labeling")

    labelset = store.labelset(report.labelset_id)
    step(echo, "label quality: each grid cell against the ground-truth masks",
         f"labeler evaluate-labels {labelset.id}")
    quality = evaluate_labels(dataset, labelset, images)
    figures["label_quality"] = {k: quality[k] for k in ("all", "held_out") if k in quality}
    for split in ("all", "held_out"):
        echo(describe_quality(quality, split))

    return LabeledScenes(images, store, labelset.id, figures)


def step(echo: Callable[[str], None], text: str, command: str) -> None:
    echo(f"\n== {text}\n   $ {command}")


def trainer(args: list[str], capture: bool) -> str:
    """Run ``trainer ARGS`` in a child process (the same Python): its output, when captured."""
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], text=True,
                          stdout=subprocess.PIPE if capture else None, check=False)
    if proc.returncode:
        raise RuntimeError(f"trainer {args[0]} failed (exit status {proc.returncode})")
    return proc.stdout or ""


def write_panels(folder: Path, store: Store, labelset_id: str, images: Path,
                 config: DemoConfig) -> list[Path]:
    """``config.panels`` PNGs of held-out images: image | ground truth | teacher top-1."""
    labelset = store.labelset(labelset_id)
    dataset = store.dataset(labelset.dataset)
    paths, classes = dataset.paths(), dataset.column("class")
    status = labelset.status()
    candidates = [int(i) for i in (held_out(paths, config.val_permille).nonzero()[0])
                  if status[i] == ImageStatus.LABELED][:config.panels]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in candidates:
        block = labelset.read_image(index)
        name = dataset.class_names[classes[index]]
        png = render_panel(str(images / paths[index]), load_mask(images / paths[index]),
                           labelset.teacher, [("teacher top-1", block.classes[0, 0])],
                           title=f"{paths[index]} ({name}), held out")
        out = folder / f"{index:05d}.png"
        out.write_bytes(png)
        written.append(out)
    return written


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
