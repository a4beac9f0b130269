"""Fitted teachers and the quickstart, measured: label quality, demo wall time, head-only cost.

``--what demo``: ``labeler demo`` run as a user runs it (a child process, a fresh directory and
store, ``--no-progress``), timed from start to exit; its figures come from the ``demo.json`` it
writes: the teacher's held-out top-1, the agreement, the dense label quality on the held-out
split (main-object and distractor cells), the student's held-out top-1.

``--what head-only``: a head-only fit from a checkpoint against one bare forward pass over the
same images. Setup (not timed): ``--images`` scenes, registered, and a random-weight
``--model`` checkpoint with 1000 classes (a stand-in for an ImageNet one: the cost is the
same). Bare forward: the images decoded as the fit decodes them (``decode_image`` at
``--input-size``) into memory first, then ``forward_features`` + the pooled features under
``torch.no_grad`` in batches of ``--batch-size``, warm-up included (the fit warms up too), once
before the fit and once after, the ratio against their mean (the machine's speed drifts). The fit:
``fit_teacher(..., head_only=True)`` timed from call to return (checkpoint load and hash, the
dense-head check, decoding in worker processes, the feature pass, 100 epochs of the head on the
cached features, held-out scoring, writing the .safetensors).

Prints a table, then one JSON line with every number (also to ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import timm
import torch

from labeler_service.sample import make_random_checkpoint
from labeler_service.scenes import make_scenes
from labeler_service.teacher_fit import FitOptions, fit_teacher
from storage import Store
from storage.images import decode_image


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="demo,head-only",
                   help="comma-separated: demo, head-only")
    p.add_argument("--images", type=int, default=256, help="head-only: scenes to fit on")
    p.add_argument("--model", default="dm_nfnet_f0", help="head-only: the backbone")
    p.add_argument("--input-size", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    common.add_scratch_args(p)
    args = p.parse_args()
    common.check_device(p, args.device)
    return args


def bench_demo(base: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "labeler_service", "demo", "--dir", str(base / "demo"),
               "--store", str(base / "store"), "--no-progress"]
    began = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=base, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise RuntimeError(f"labeler demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    figures = json.loads((base / "demo" / "demo.json").read_text())
    held = figures["label_quality"]["held_out"]
    return {"demo_seconds": seconds, "teacher_heldout_top1": figures["teacher_heldout_top1"],
            "agreement_top1": figures["agreement"]["top1"],
            "agreement_top5": figures["agreement"]["top5"],
            "heldout_images": held["images"], "heldout_main_top1": held["main_top1"],
            "heldout_distractor_top1": held["distractor_top1"],
            "heldout_object_top5": held["object_top5"], "heldout_miou": held["miou"],
            "heldout_background_share": held["background_share"],
            "heldout_ece": held["reliability"]["ece"],
            "student_heldout_top1": figures["student_heldout_top1"],
            "demo_output": proc.stdout.splitlines()}


@torch.no_grad()
def bare_forward(model: torch.nn.Module, pixels: np.ndarray, mean, std, batch: int,
                 device: torch.device) -> float:
    """Seconds of one pass of the backbone over pre-decoded images, warm-up batch included (the
    fit warms up too)."""
    x_all = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    x_all = (x_all - mean * 255) / (std * 255)
    model.eval().to(device)
    began = time.perf_counter()
    for start in range(0, len(x_all), batch):
        model.forward_head(model.forward_features(x_all[start:start + batch].to(device)),
                           pre_logits=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def bench_head_only(base: Path, args: argparse.Namespace) -> dict:
    images = make_scenes(base / "scenes", images=args.images, seed=3)
    store = Store.open(base / "store")
    store.add_dataset("scenes", images)
    checkpoint = make_random_checkpoint(base / f"{args.model}.safetensors", model=args.model,
                                        num_classes=1000)
    model = timm.create_model(args.model, num_classes=1000)
    cfg = timm.data.resolve_data_config({}, model=model)
    manifest = store.dataset("scenes").manifest()
    pixels = np.stack([decode_image((images / p).read_bytes(), args.input_size,
                                    cfg["interpolation"]) for p in manifest.path])
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    device = torch.device(args.device)
    # The machine's speed drifts over minutes: a bare pass before and after the fit, and the
    # ratio against their mean.
    before = bare_forward(model, pixels, mean, std, args.batch_size, device)
    began = time.perf_counter()
    report = fit_teacher(store, "scenes", args.model, base / "head.safetensors",
                         FitOptions(input_size=args.input_size, batch_size=args.batch_size,
                                    device=args.device, progress=False),
                         checkpoint=checkpoint, head_only=True)
    fit = time.perf_counter() - began
    after = bare_forward(model, pixels, mean, std, args.batch_size, device)
    forward = (before + after) / 2
    return {"head_only_images": args.images, "head_only_model": args.model,
            "head_only_input_size": args.input_size, "bare_forward_seconds": forward,
            "bare_forward_before_after": [before, after],
            "head_only_fit_seconds": fit, "head_only_feature_seconds": report.feature_seconds,
            "head_only_ratio": fit / forward}


def run(args: argparse.Namespace) -> dict:
    out: dict = {"device": args.device, "torch_threads": torch.get_num_threads()}
    what = set(args.what.split(","))
    with common.scratch_dir(args, "bench-teacher-") as base:
        if "head-only" in what:
            out.update(bench_head_only(base / "head", args))
        if "demo" in what:
            (base / "demo").mkdir()
            out.update(bench_demo(base / "demo"))
    return out


def print_table(out: dict) -> None:
    rows = []
    if "demo_seconds" in out:
        rows += [("labeler demo wall time", f"{out['demo_seconds']:.0f} s", "<= 600 s"),
                 ("teacher held-out top-1", f"{100 * out['teacher_heldout_top1']:.1f} %",
                  ">= 90 %"),
                 ("agreement top-1 / top-5 (all images)",
                  f"{100 * out['agreement_top1']:.1f} / {100 * out['agreement_top5']:.1f} %", ""),
                 ("dense top-1, main-object cells (held-out)",
                  f"{100 * out['heldout_main_top1']:.1f} %", ">= 80 %"),
                 ("dense top-1, distractor cells (held-out)",
                  f"{100 * out['heldout_distractor_top1']:.1f} %", ">= 60 %"),
                 ("dense top-5 / mIoU / ECE (held-out)",
                  f"{100 * out['heldout_object_top5']:.1f} / {100 * out['heldout_miou']:.1f} / "
                  f"{100 * out['heldout_ece']:.1f} %", ""),
                 ("student held-out top-1", f"{100 * out['student_heldout_top1']:.1f} %", "")]
    if "head_only_ratio" in out:
        rows += [(f"bare forward, {out['head_only_images']} images "
                  f"({out['head_only_model']}@{out['head_only_input_size']})",
                  f"{out['bare_forward_seconds']:.1f} s", ""),
                 ("head-only fit", f"{out['head_only_fit_seconds']:.1f} s", ""),
                 ("ratio", f"{out['head_only_ratio']:.2f}", "<= 1.3")]
    print("| measure | value | target |\n| --- | ---: | --- |")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")


if __name__ == "__main__":
    common.main(parse_args, run, print_table)
