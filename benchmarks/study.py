"""The study: what token labels, MixToken, STA, ANF and registers do, measured against the
scenes' ground-truth masks.

One command makes (or reuses) the quickstart's scenes, teacher and label set
(``labeler_service.demo.make_labels``, the same defaults), trains every arm at equal budget (same
steps, same data order per seed, same model and optimiser; only the arm's switch differs), scores
each run on held-out images and writes ``docs/study.md`` with its tables and figures.

Splits, by path hash (``storage.splits.split_bucket``): buckets 0-199 are the **test** split (the
teacher never trained on them either), 200-299 the **validation** split, the rest trains. The
student holds out both (``--val-permille 300``). ``--tune`` picks the learning rate on the
validation split, for every arm alike (the mean of arms 1 and 3); the report's numbers are on the
test split only.

    python benchmarks/study.py --dir /tmp/study             # the full CPU study (~80 min, 2 cores)
    python benchmarks/study.py --dir /tmp/study --quick     # 1 seed, a few steps: a smoke test
    python benchmarks/study.py --dir /data/study --device cuda --scale gpu

Each run's metrics go to ``DIR/runs/ARM-sSEED.json``; a run whose file exists is not run again,
so an interrupted study goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from labeler_service.demo import DemoConfig, make_labels
from labeler_service.heatmap import render_panel
from labeler_service.quality import cell_ground_truth, cell_object_fraction, dense_quality
from labeler_service.scenes import load_mask
from storage import Store, TeacherSpec
from storage.splits import split_bucket
from trainer.data.normalize import Normalize
from trainer.data.stream import StreamConfig, TokenLabelStream
from trainer.evaluate import (
    attention_entropy,
    foreground_precision,
    load_checkpoint,
    outlier_token_share,
    position_share,
)
from trainer.models import create_model
from trainer.train import TrainConfig, train

TEST_BUCKETS, VAL_BUCKETS = (0, 200), (200, 300)  # per mille; the student trains on the rest


@dataclass(frozen=True)
class Arm:
    name: str
    title: str
    train: dict = field(default_factory=dict)  # TrainConfig fields
    model: dict = field(default_factory=dict)  # model options


EMBED_DIM = 128  # lvvit_nano's, for the rank-D/4 gate
ARMS = (
    Arm("gt-only", "1. ground truth only (`--no-token-label`)", {"token_label": False}),
    Arm("image-distill", "2. the teacher's crop label on the class token, no token loss",
        {"beta": 0.0}),
    Arm("token-label", "3. token labeling: class + token loss, MixToken (the method)"),
    Arm("no-mixtoken", "4. token labeling without MixToken", {"mix_token": False}),
    Arm("sta", "5. 3 + STA", model={"sta": True}),
    Arm("anf", "6. 3 + ANF, full gate", model={"anf": True}),
    Arm("anf-rank", "7. 3 + ANF, gate rank D/4",
        model={"anf": True, "anf_gate_rank": EMBED_DIM // 4}),
    Arm("anf-no-norm", "8. 3 + ANF without its LayerNorm", model={"anf": True, "anf_norm": False}),
    Arm("registers", "9. 3 + 4 registers", model={"registers": 4}),
)
PANEL_ARMS = ("gt-only", "token-label", "sta", "anf", "registers")


@dataclass(frozen=True)
class StudyConfig:
    """The budget and the shared hyper-parameters; ``lr`` is the one ``--tune`` chooses."""

    labels: DemoConfig = field(default_factory=DemoConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 6
    batch_size: int = 32
    lr: float = 0.03  # per 1024 images (the trainer's unit)
    warmup_epochs: float = 1.0
    beta: float = 0.5
    crop_scale: float = 0.8
    max_steps_per_epoch: int | None = None
    tune_lrs: tuple[float, ...] = (0.03, 0.06)
    probe_images: int = 400  # training-split images whose tokens fit the linear probe
    panels: int = 2
    device: str = "cpu"


SCALES = {
    "cpu": StudyConfig(),
    "quick": StudyConfig(labels=replace(DemoConfig(), images=120, teacher_epochs=1,
                                        progress=False),
                         seeds=(0,), epochs=1, max_steps_per_epoch=3, tune_lrs=(0.03,),
                         probe_images=32, panels=1),
    # Not run yet (no GPU lent): ten times the images and a longer schedule.
    "gpu": StudyConfig(labels=replace(DemoConfig(), images=25_000, teacher_epochs=30,
                                      workers=8),
                       epochs=40, batch_size=128, device="cuda"),
}


# -- one run ----------------------------------------------------------------------------------

def train_arm(work: Path, labelset_id: str, arm: Arm, seed: int, lr: float,
              config: StudyConfig) -> tuple[Path, dict]:
    """Train one arm with one seed; its checkpoint and the timing."""
    out = work / "checkpoints" / f"{arm.name}-s{seed}-lr{lr:g}"
    labels = config.labels
    shared = {"model": labels.student, "input_size": labels.student_size,
              "epochs": config.epochs, "batch_size": config.batch_size, "lr": lr,
              "warmup_epochs": config.warmup_epochs, "beta": config.beta,
              "crop_scale": (config.crop_scale, 1.0), "workers": labels.workers, "seed": seed,
              "val_permille": VAL_BUCKETS[1], "progress": False,
              "max_steps_per_epoch": config.max_steps_per_epoch, "save_every": 10**9}
    train_config = TrainConfig(store=str(work / "store"), dataset="scenes", labels=labelset_id,
                               out=str(out), **{**shared, **arm.train},
                               model_kwargs=dict(arm.model))
    began = time.perf_counter()
    last = train(train_config)
    seconds = time.perf_counter() - began
    # The step time is the last epoch's (loader waits included, start-up and saving not).
    rate = last.get("images_per_s") or float("nan")
    return out / "last.pt", {"train_seconds": seconds, "steps": last.get("step", 0),
                             "seconds_per_step": config.batch_size / rate,
                             "images_per_s_last_epoch": rate, "final_loss": last.get("loss")}


@dataclass
class EvalImages:
    """Decoded images of one split with their ground truth on the student's grid."""

    index: np.ndarray  # dataset rows
    pixels: torch.Tensor  # uint8 [N, 3, S, S]
    label: np.ndarray  # [N]
    truth: np.ndarray  # [N, h, w] cell class, -1 background
    object_fraction: np.ndarray  # [N, h, w]


def load_split(work: Path, labelset_id: str, size: int, grid: tuple[int, int], split: str,
               buckets: tuple[int, int] | None, limit: int | None = None) -> EvalImages:
    """The images of ``split`` (the trainer's ``val`` or ``train`` stream, not augmented: the
    whole image resized, as ``trainer eval`` sees it) whose bucket is in ``buckets``."""
    stream = TokenLabelStream(StreamConfig(
        store=str(work / "store"), dataset="scenes", labelset=labelset_id, image_size=size,
        split=split, augment=False, val_permille=VAL_BUCKETS[1]))
    dataset = Store.open(work / "store", mode="r").dataset("scenes")
    paths = dataset.paths()
    bucket = split_bucket(paths)
    geometry = TeacherSpec(model="student", checkpoint_sha256=None, num_classes=1,
                           input_size=size)  # the student sees the whole image, squashed
    rows, pixels, labels = [], [], []
    for batch in DataLoader(stream, batch_size=64, num_workers=0):
        for i, row in enumerate(batch["index"].tolist()):
            if buckets and not buckets[0] <= bucket[row] < buckets[1]:
                continue
            rows.append(row)
            pixels.append(batch["image"][i])
            labels.append(int(batch["target"][i]))
        if limit and len(rows) >= limit:
            break
    rows, labels = rows[:limit], labels[:limit]
    order = np.argsort(rows)  # the stream's order is shuffled; the report's is by row
    masks = [load_mask(Path(dataset.source_root) / paths[rows[i]]) for i in order]
    return EvalImages(
        index=np.asarray(rows)[order], pixels=torch.stack(pixels[:len(rows)])[order],
        label=np.asarray(labels)[order],
        truth=np.stack([cell_ground_truth(m, grid, geometry) for m in masks]),
        object_fraction=np.stack([cell_object_fraction(m, grid, geometry) for m in masks]))


@torch.no_grad()
def forward_all(model: torch.nn.Module, normalize: Normalize, images: EvalImages,
                batch: int = 128) -> dict:
    """Everything the metrics need, for every image: scores, token logits, pre-norm patch
    tokens, final patch tokens, the class token's last-block attention over patches."""
    prefix = model.num_prefix_tokens
    out: dict[str, list] = {k: [] for k in ("score", "cls", "token", "pre", "post", "attn")}
    for start in range(0, len(images.index), batch):
        x = normalize(images.pixels[start:start + batch])
        pre = model.forward_features(x, pre_norm=True)
        post = model.norm(pre)
        cls_logits, token_logits = model.forward_head(post)
        # the inference score, as model(x) computes it, without a second forward pass
        score = cls_logits + model.config.token_score_weight * token_logits.amax(dim=1)
        out["score"].append(score.cpu())
        out["cls"].append(cls_logits.cpu())
        out["token"].append(token_logits.cpu())
        out["pre"].append(pre[:, prefix:].cpu())
        out["post"].append(post[:, prefix:].cpu())
        out["attn"].append(model.attention_maps(x)[-1][:, :, 0, prefix:].cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def segmentation_miou(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes (background included, as class ``num_classes - 1``) present in
    the truth or the prediction."""
    p, t = predicted.ravel(), truth.ravel()
    ious = []
    for c in range(num_classes):
        union = np.sum((p == c) | (t == c))
        if union:
            ious.append(np.sum((p == c) & (t == c)) / union)
    return float(np.mean(ious)) if ious else 0.0


def linear_probe(train_tokens: torch.Tensor, train_truth: np.ndarray, test_tokens: torch.Tensor,
                 num_classes: int, steps: int = 100) -> np.ndarray:
    """A linear head on frozen patch tokens ``[N, T, D]`` -> per-token class (background is
    class ``num_classes``), fitted by L-BFGS on the training tokens; predictions ``[N', T]``."""
    x = train_tokens.reshape(-1, train_tokens.shape[-1]).float()
    y = torch.from_numpy(np.where(train_truth < 0, num_classes, train_truth).reshape(-1))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], num_classes + 1)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head((x - mean) / std), y) \
            + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return head((test_tokens.float() - mean) / std).argmax(-1).numpy()


def evaluate_run(checkpoint: Path, test: EvalImages, probe: EvalImages, num_classes: int,
                 val: EvalImages | None = None) -> dict:
    model, normalize = load_checkpoint(checkpoint, torch.device("cpu"))
    grid = model.grid
    result = {"test": split_metrics(model, normalize, test, probe, num_classes, grid)}
    if val is not None:
        out = forward_all(model, normalize, val)
        result["val"] = {"top1": float((out["score"].argmax(1).numpy() == val.label).mean())}
    return result


def split_metrics(model, normalize: Normalize, images: EvalImages, probe: EvalImages,
                  num_classes: int, grid: tuple[int, int]) -> dict:
    out = forward_all(model, normalize, images)
    n = len(images.index)
    token_probs = out["token"].softmax(-1)  # [N, T, C]
    top = token_probs.topk(min(5, num_classes), dim=-1)
    predicted = top.indices.permute(0, 2, 1).reshape(n, -1, *grid).numpy()
    confidence = top.values[..., 0].reshape(n, *grid).numpy()
    dense = dense_quality(images.truth, predicted, confidence, images.label, num_classes)
    probe_out = forward_all(model, normalize, probe)
    probe_pred = linear_probe(probe_out["post"], probe.truth, out["post"], num_classes)
    truth_bg = np.where(images.truth < 0, num_classes, images.truth).reshape(n, -1)
    attention = out["attn"]  # [N, heads, T]
    return {
        "images": n,
        "top1": float((out["score"].argmax(1).numpy() == images.label).mean()),
        "cls_top1": float((out["cls"].argmax(1).numpy() == images.label).mean()),
        "token_main_top1": dense["main_top1"], "token_distractor_top1": dense["distractor_top1"],
        "token_object_top1": dense["object_top1"], "token_miou": dense["miou"],
        "probe_miou": segmentation_miou(probe_pred, truth_bg, num_classes + 1),
        "outlier_token_share": outlier_token_share(out["pre"]),
        "cls_attention_entropy": float(attention_entropy(attention).mean()),
        "cls_attention_foreground": float(foreground_precision(
            attention.mean(1), torch.from_numpy(images.object_fraction.reshape(n, -1))).mean()),
        "position_share": position_share(out["pre"]),
    }


def write_run_panels(folder: Path, checkpoint: Path, arm: Arm, images: EvalImages, work: Path,
                     labelset_id: str, count: int) -> list[str]:
    """image | ground truth | teacher top-1 | student token top-1 | class-token attention."""
    model, normalize = load_checkpoint(checkpoint, torch.device("cpu"))
    store = Store.open(work / "store", mode="r")
    labelset, dataset = store.labelset(labelset_id), store.dataset("scenes")
    root, paths = Path(dataset.source_root), dataset.paths()
    subset = EvalImages(images.index[:count], images.pixels[:count], images.label[:count],
                        images.truth[:count], images.object_fraction[:count])
    out = forward_all(model, normalize, subset)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, row in enumerate(subset.index):
        student = out["token"][i].argmax(-1).reshape(model.grid).numpy()
        attention = out["attn"][i].mean(0).reshape(model.grid).numpy()
        png = render_panel(str(root / paths[row]), load_mask(root / paths[row]), labelset.teacher,
                           [("teacher top-1", labelset.read_image(int(row)).classes[0, 0]),
                            ("student tokens", student), ("class-token attention", attention)],
                           title=f"{arm.title} - {paths[row]}")
        path = folder / f"{arm.name}-{int(row):05d}.png"
        path.write_bytes(png)
        written.append(path.name)
    return written


# -- the whole study ---------------------------------------------------------------------------

def run_study(work: Path, config: StudyConfig, arms: tuple[Arm, ...], tune: bool,
              echo=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    labeled = make_labels(work, str(work / "store"), config.labels, echo=echo)
    labelset_id = labeled.labelset_id
    num_classes = len(labeled.store.dataset("scenes").class_names)
    size = config.labels.student_size
    grid = create_model(config.labels.student, num_classes=num_classes, img_size=size).grid
    test = load_split(work, labelset_id, size, grid, "val", TEST_BUCKETS)
    val = load_split(work, labelset_id, size, grid, "val", VAL_BUCKETS)
    probe = load_split(work, labelset_id, size, grid, "train", None, config.probe_images)
    echo(f"splits: test {len(test.index)}, validation {len(val.index)}, probe {len(probe.index)}")
    runs_dir = work / "runs"
    runs_dir.mkdir(exist_ok=True)

    def run(arm: Arm, seed: int, lr: float, with_val: bool) -> dict:
        path = runs_dir / f"{arm.name}-s{seed}-lr{lr:g}.json"
        if path.is_file():
            return json.loads(path.read_text())
        echo(f"run {arm.name} seed {seed} lr {lr:g}")
        checkpoint, timing = train_arm(work, labelset_id, arm, seed, lr, config)
        result = {"arm": arm.name, "seed": seed, "lr": lr, **timing,
                  **evaluate_run(checkpoint, test, probe, num_classes,
                                 val if with_val else None)}
        if seed == config.seeds[0] and arm.name in PANEL_ARMS:
            result["panels"] = write_run_panels(work / "panels", checkpoint, arm, test, work,
                                                labelset_id, config.panels)
        path.write_text(json.dumps(result, indent=2) + "\n")
        echo(f"  test top-1 {result['test']['top1']:.3f}, {timing['seconds_per_step']:.2f} s/step")
        return result

    lr, tuning = config.lr, []
    by_name = {a.name: a for a in ARMS}
    if tune:
        for candidate in config.tune_lrs:
            scores = [run(by_name[name], config.seeds[0], candidate, True)["val"]["top1"]
                      for name in ("gt-only", "token-label")]
            tuning.append({"lr": candidate, "val_top1_gt_only": scores[0],
                           "val_top1_token_label": scores[1], "mean": float(np.mean(scores))})
        lr = max(tuning, key=lambda t: t["mean"])["lr"]
        echo(f"lr chosen on the validation split: {lr:g}")
    runs = [run(arm, seed, lr, False) for arm in arms for seed in config.seeds]
    return {"config": asdict(config), "lr": lr, "tuning": tuning, "runs": runs,
            "teacher": labeled.figures, "splits": {"test": len(test.index),
                                                   "validation": len(val.index),
                                                   "probe": len(probe.index)},
            "seconds": time.perf_counter() - began}


# -- the report --------------------------------------------------------------------------------

METRICS = (  # key, column title, percent
    ("top1", "top-1", True), ("cls_top1", "class-token top-1", True),
    ("token_main_top1", "token head, main cells", True),
    ("token_distractor_top1", "token head, distractor cells", True),
    ("probe_miou", "linear-probe mIoU", True),
    ("outlier_token_share", "tokens > 3x median norm", True),
    ("cls_attention_entropy", "CLS attention entropy", False),
    ("cls_attention_foreground", "CLS attention on objects", True),
    ("position_share", "variance from position", True),
)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}


def mean_std(values: list[float], percent: bool) -> str:
    k = 100 if percent else 1
    if len(values) == 1:
        return f"{k * values[0]:.1f}" if percent else f"{values[0]:.3f}"
    m, s = statistics.mean(values), statistics.stdev(values)
    return f"{k * m:.1f} ± {k * s:.1f}" if percent else f"{m:.3f} ± {s:.3f}"


def paired(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean of a - b over seeds and the half-width of its 95 % t interval (None for 1 seed)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return statistics.mean(d), None
    return statistics.mean(d), T_975.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))


def per_arm(study: dict) -> dict[str, dict[str, list[float]]]:
    table: dict[str, dict[str, list[float]]] = {}
    for run in sorted(study["runs"], key=lambda r: r["seed"]):
        row = table.setdefault(run["arm"], {})
        for key, _, _ in METRICS:
            value = run["test"][key]
            row.setdefault(key, []).append(float("nan") if value is None else value)
        row.setdefault("seconds_per_step", []).append(run["seconds_per_step"])
    return table


def figures(study: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = per_arm(study)
    names = [a.name for a in ARMS if a.name in table]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    groups = [("study-accuracy.png", ("top1", "cls_top1"), "held-out top-1 (%)"),
              ("study-dense.png", ("token_main_top1", "token_distractor_top1", "probe_miou"),
               "held-out dense scores (%)"),
              ("study-artifacts.png", ("outlier_token_share", "cls_attention_foreground",
                                       "position_share"), "artifact metrics (%)")]
    titles = {k: t for k, t, _ in METRICS}
    for filename, keys, ylabel in groups:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            means = [100 * np.nanmean(table[n][key]) for n in names]
            stds = [100 * np.nanstd(table[n][key], ddof=1) if len(table[n][key]) > 1 else 0
                    for n in names]
            ax.bar(np.arange(len(names)) + (j - (len(keys) - 1) / 2) * width, means, width,
                   yerr=stds, capsize=3, label=titles[key])
        ax.set_xticks(np.arange(len(names)), names, rotation=20)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=90)
        plt.close(fig)
        written.append(filename)
    return written


def write_report(study: dict, report: Path, command: str, work: Path) -> None:
    """``report`` (markdown) with generated tables and figures; the prose lives in the
    ``<!-- prose -->`` block of an existing report and is kept."""
    folder = report.parent / "images"
    figure_files = figures(study, folder)
    panel_files = []
    for run in study["runs"]:
        for name in run.get("panels", []):
            (folder / name).write_bytes((work / "panels" / name).read_bytes())
            panel_files.append(name)
    table = per_arm(study)
    names = [a for a in ARMS if a.name in table]
    lines = ["## Results (generated)", "",
             f"Command: `{command}`; machine: {platform.machine()}, {torch.get_num_threads()} "
             f"torch threads, {platform.python_version()}, torch {torch.__version__}; wall time "
             f"{study['seconds'] / 60:.0f} min; seeds {list(study['config']['seeds'])}; "
             f"learning rate {study['lr']:g} per 1024 images"
             + (" (chosen on the validation split, below)." if study["tuning"] else "."), "",
             f"Teacher: held-out top-1 {100 * study['teacher']['teacher_heldout_top1']:.1f} %; "
             "its dense labels on held-out images: main-object cells "
             f"{100 * study['teacher']['label_quality']['held_out']['main_top1']:.1f} %, "
             "distractor cells "
             f"{100 * study['teacher']['label_quality']['held_out']['distractor_top1']:.1f} %. "
             f"Test split {study['splits']['test']} images, validation "
             f"{study['splits']['validation']}, probe {study['splits']['probe']} training images.",
             "", "Per arm, mean ± std over seeds, test split:", "",
             "| arm | " + " | ".join(t for _, t, _ in METRICS) + " | s/step |",
             "| --- |" + " ---: |" * (len(METRICS) + 1)]
    for arm in names:
        row = table[arm.name]
        lines.append(f"| {arm.title} | " + " | ".join(mean_std(row[k], p) for k, _, p in METRICS)
                     + f" | {mean_std(row['seconds_per_step'], False)} |")
    for base in ("gt-only", "token-label"):
        if base not in table:
            continue
        lines += ["", f"Paired differences against `{base}` (same seeds), percentage points, "
                      "mean and 95 % interval over seeds:", "",
                  "| arm | " + " | ".join(t for k, t, p in METRICS[:5]) + " |",
                  "| --- |" + " ---: |" * 5]
        for arm in names:
            if arm.name == base:
                continue
            cells = []
            for key, _, _ in METRICS[:5]:
                mean, half = paired(table[arm.name][key], table[base][key])
                interval = "" if half is None else f" ± {100 * half:.1f}"
                cells.append(f"{100 * mean:+.1f}{interval}")
            lines.append(f"| {arm.title} | " + " | ".join(cells) + " |")
    if study["tuning"]:
        lines += ["", "Learning-rate choice (seed 0, validation split top-1):", "",
                  "| lr | ground truth only | token labeling | mean |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {t['lr']:g} | {100 * t['val_top1_gt_only']:.1f} | "
                  f"{100 * t['val_top1_token_label']:.1f} | {100 * t['mean']:.1f} |"
                  for t in study["tuning"]]
    lines += [""] + [f"![{f}](images/{f})" for f in figure_files]
    if panel_files:
        lines += ["", "Panels (image | ground truth | teacher top-1 | student token top-1 | "
                      "class-token attention), seed 0, test images:", ""]
        lines += [f"![{f}](images/{f})" for f in panel_files]
    generated = "\n".join(lines) + "\n"
    prose = ("<!-- prose -->\n# The study\n\n(What the figures say goes here.)\n"
             "<!-- /prose -->\n")
    if report.is_file():
        text = report.read_text()
        if "<!-- prose -->" in text and "<!-- /prose -->" in text:
            prose = text[text.index("<!-- prose -->"):text.index("<!-- /prose -->")] \
                + "<!-- /prose -->\n"
    report.write_text(prose + "\n" + generated)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="work folder (kept, resumable)")
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps: a smoke test")
    p.add_argument("--scale", choices=sorted(SCALES), default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the scale's)")
    p.add_argument("--arms", default=",".join(a.name for a in ARMS))
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                   help="choose the learning rate on the validation split first")
    p.add_argument("--report", type=Path,
                   default=Path(__file__).resolve().parent.parent / "docs" / "study.md")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    config = SCALES[args.scale or ("quick" if args.quick else "cpu")]
    if args.device:
        config = replace(config, device=args.device)
    wanted = set(args.arms.split(","))
    unknown = wanted - {a.name for a in ARMS}
    if unknown:
        p.error(f"unknown arms: {sorted(unknown)}")
    study = run_study(args.dir, config, tuple(a for a in ARMS if a.name in wanted), args.tune)
    command = "python benchmarks/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(study, args.report, command, args.dir)
    (args.json_out or args.dir / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
