"""``labeler``: register datasets, label them in one process, check and import stores."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from labeler_service.checkpoint_files import OUTPUT_STRIDES
from labeler_service.reports import echo_fit_report, echo_label_report, echo_verify_report
from labeler_service.settings import INPUT_SIZE_MAX, INPUT_SIZE_MIN
from storage import Store, StoreError
from storage.labelset import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE

store_option = click.option(
    "--store", "store_location", envvar="LABELER_STORE", default="store", show_default=True,
    help="Store path or fsspec URL (env LABELER_STORE).")


def user_errors(fn):
    """Turn the errors a user can fix into a one-line message and exit status 1. (TeacherError
    and LabelSpaceMismatch are ValueErrors: naming them would import torch into every command,
    ~4 s and ~800 MB for `labeler datasets list`.)"""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StoreError, ValueError, FileNotFoundError, NotADirectoryError,
                PermissionError) as e:
            raise click.ClickException(str(e)) from None
        except KeyError as e:
            raise click.ClickException(e.args[0] if e.args else str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Dense token labels: datasets, labeling jobs and the label store."""


# -- datasets ---------------------------------------------------------------------------------

@main.group()
def datasets() -> None:
    """Register and inspect image datasets."""


@datasets.command("add")
@click.argument("name")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@store_option
@user_errors
def datasets_add(name: str, directory: Path, store_location: str) -> None:
    """Register every image under DIRECTORY (recursively) as dataset NAME."""
    store = Store.open(store_location)
    dataset, created = store.add_dataset(name, directory)
    verb = "registered" if created else "already registered (unchanged)"
    classes = f", {len(dataset.class_names)} classes" if dataset.class_names else ""
    click.echo(f"{name}: {verb}: {dataset.num_images} images{classes}, "
               f"fingerprint {dataset.fingerprint[:16]}")
    if dataset.skipped_names is not None:
        click.echo(f"{name}: {dataset.skipped_names.describe()}")


@datasets.command("list")
@store_option
@user_errors
def datasets_list(store_location: str) -> None:
    """List datasets and their label sets."""
    from storage.errors import DatasetUnfinished

    store = Store.open(store_location, mode="r")
    for name in store.dataset_names():
        try:
            dataset = store.dataset(name)
        except DatasetUnfinished:  # a registration in progress, paused or interrupted
            click.echo(f"{name}\tunfinished registration (in progress, paused or interrupted)")
            continue
        except StoreError as e:  # one damaged dataset hides none of the others
            click.echo(f"{name}\tcannot be read: {e}")
            continue
        click.echo(f"{name}\t{dataset.num_images} images\t{dataset.source_root}")
        for labelset_id in dataset.labelset_ids():
            labelset = dataset.labelset(labelset_id)
            done = (labelset.num_shards if labelset.completion() is not None
                    else labelset.num_shards - len(labelset.pending_shards()))
            agreement = labelset.attrs.get("agreement")
            shown = ""
            if agreement and agreement.get("top1") is not None:
                shown = (f"\tagreement top-1 {100 * agreement['top1']:.1f} %, "
                         f"top-{agreement['k']} {100 * agreement['top5']:.1f} %")
            elif agreement:
                shown = "\tagreement n/a"
            click.echo(f"  {labelset_id}\t{done}/{labelset.num_shards} shards{shown}")


# -- labeling ---------------------------------------------------------------------------------

@main.command()
@click.argument("dataset")
@click.option("--model", required=True, help="timm model name, e.g. dm_nfnet_f6.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local timm state dict (.pth/.pt/.bin) or .safetensors. Required unless "
                   "--random-weights.")
@click.option("--random-weights", is_flag=True,
              help="No checkpoint: random weights (speed tests only; labels are meaningless).")
@click.option("--input-size", type=click.IntRange(INPUT_SIZE_MIN, INPUT_SIZE_MAX), required=True,
              help="The whole image is resized to this square size.")
@click.option("--topk", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--output-stride", type=click.Choice([str(s) for s in OUTPUT_STRIDES]), default=None,
              help="Dilate the teacher to this stride for a denser grid (default: the "
                   "checkpoint's from `labeler teacher fit`, else the model's own).")
@store_option
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Image decoding processes (default: on CUDA min(8, cores - 1); on CPU "
                   "cores / 4, at least 1, since the teacher uses every core).")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
              show_default=True, help="Autocast dtype on CUDA (the head and lse are always fp32).")
@click.option("--compile", "compile_teacher", is_flag=True,
              help="torch.compile the teacher (compiled once at start, for --batch-size; "
                   "the labels are the same to rounding).")
@click.option("--shard-size", type=click.IntRange(1), default=DEFAULT_SHARD_SIZE,
              show_default=True, help="Images per shard (new label sets only).")
@click.option("--chunk-size", type=click.IntRange(1), default=None,
              help=f"Images per inner chunk, dividing --shard-size (new label sets only; "
                   f"default: the largest divisor <= {DEFAULT_CHUNK_SIZE}).")
@click.option("--part", default="0/1", show_default=True,
              help="i/n: label only shards s with s %% n == i (for several processes).")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Refuse images with more pixels (default: Pillow's bomb limit).")
@click.option("--ignore-dataset-classes", is_flag=True,
              help="Label even when the teacher's class count differs from the dataset's.")
@click.option("--retry-failed", is_flag=True,
              help="Also relabel shards holding failed images (after fixing the files).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def label(dataset: str, model: str, checkpoint: Path | None, random_weights: bool,
          input_size: int, topk: int, output_stride: str | None, store_location: str,
          device: str, batch_size: int,
          workers: int | None, precision: str, compile_teacher: bool, shard_size: int,
          chunk_size: int | None, part: str, max_pixels: int | None,
          ignore_dataset_classes: bool, retry_failed: bool, progress: bool) -> None:
    """Label DATASET with a dense teacher, in this process (resumable)."""
    from labeler_service.labeling import LabelingOptions, label_dataset, parse_part
    from storage.images import DEFAULT_MAX_PIXELS

    if (checkpoint is None) == (not random_weights):
        raise click.UsageError("give exactly one of --checkpoint FILE and --random-weights")
    options = LabelingOptions(batch_size=batch_size, num_workers=workers, device=device,
                              precision=precision, compile=compile_teacher,
                              max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                              shard_size=shard_size, chunk_size=chunk_size, progress=progress)
    store = Store.open(store_location)
    report = label_dataset(store, dataset, model, checkpoint, input_size, topk, options,
                           part=parse_part(part), ignore_dataset_classes=ignore_dataset_classes,
                           retry_failed=retry_failed,
                           output_stride=int(output_stride) if output_stride else None)
    echo_label_report(report, store, dataset, click.echo)
    if report.images_failed and not report.images_labeled:
        raise click.ClickException("no image could be labeled: the job failed as a whole")


# -- teachers ---------------------------------------------------------------------------------

@main.group()
def teacher() -> None:
    """Fit a teacher to a dataset's own classes."""


@teacher.command("fit")
@click.argument("dataset")
@click.option("--model", required=True,
              help="timm model whose head is global average pool + linear, e.g. dm_nfnet_f0, "
                   "test_nfnet.")
@click.option("--input-size", type=click.IntRange(INPUT_SIZE_MIN, INPUT_SIZE_MAX), required=True,
              help="Training input size (a multiple of the model's stride).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The teacher, .safetensors; its JSON report goes beside it (.json).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local pretrained checkpoint of the same model: every weight but the head.")
@click.option("--head-only", is_flag=True,
              help="Fit only a new linear head on the checkpoint's frozen features (computed "
                   "once).")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Default: 10 (the whole network), 100 (head only).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Peak AdamW learning rate (default: 3e-3; 2e-4 fine-tuning a checkpoint).")
@click.option("--val-permille", type=click.IntRange(0, 999), default=100, show_default=True,
              help="Images held out by path hash to measure the teacher, per mille.")
@click.option("--output-stride", type=click.Choice([str(s) for s in OUTPUT_STRIDES]), default=None,
              help="Dilate the model to this stride (e.g. 16: a grid twice as dense at the same "
                   "input size); recorded, so `labeler label` uses it too.")
@click.option("--crop-scale", type=click.FloatRange(0.05, 1.0), default=0.5, show_default=True,
              help="Smallest RandomResizedCrop area, as a share of the image (1: whole images).")
@click.option("--zoom-out", type=click.FloatRange(1.0, 4.0), default=1.0, show_default=True,
              help="Also show half of the training crops shrunk by up to this factor (objects "
                   "smaller than whole images show them).")
@store_option
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Image decoding processes (default as for `labeler label`).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def teacher_fit_cmd(dataset: str, model: str, input_size: int, out: Path,
                    checkpoint: Path | None, head_only: bool, epochs: int | None,
                    batch_size: int, lr: float | None, val_permille: int,
                    output_stride: str | None, crop_scale: float, zoom_out: float,
                    store_location: str,
                    device: str, workers: int | None, seed: int, progress: bool) -> None:
    """Train MODEL on DATASET's ImageFolder classes; write a teacher `labeler label` takes."""
    from labeler_service.teacher_fit import FitOptions, fit_teacher, report_path_for

    options = FitOptions(input_size=input_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         val_permille=val_permille, device=device, workers=workers, seed=seed,
                         output_stride=int(output_stride) if output_stride else None,
                         crop_scale=(crop_scale, 1.0), zoom_out=zoom_out, progress=progress)
    report = fit_teacher(Store.open(store_location), dataset, model, out, options,
                         checkpoint=checkpoint, head_only=head_only)
    echo_fit_report(report, click.echo)
    click.echo(f"teacher: {out} (report: {report_path_for(out)})")


# -- label quality ----------------------------------------------------------------------------

@main.command("evaluate-labels")
@click.argument("labelset_id", metavar="LABELSET")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder of ground-truth masks mirroring the images "
                                 "(docs/scenes-format.md); default: beside the images.")
@click.option("--val-permille", type=click.IntRange(1, 999), default=None,
              help="Also report the held-out split (default: the teacher's own, when `labeler "
                   "teacher fit` fitted it on this dataset).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@store_option
@user_errors
def evaluate_labels_cmd(labelset_id: str, masks: Path | None, val_permille: int | None,
                        as_json: bool, store_location: str) -> None:
    """Score LABELSET's dense maps against per-pixel ground truth; record it in the label set."""
    import json

    from labeler_service.quality import describe_left_out, describe_quality, evaluate_labels

    store = Store.open(store_location)
    labelset = store.labelset(labelset_id)
    dataset = store.dataset(labelset.dataset)
    result = evaluate_labels(dataset, labelset, masks or Path(dataset.source_root), val_permille)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for split in ("all", "held_out"):
        if split in result:
            click.echo(describe_quality(result, split))
    left_out = describe_left_out(result)
    if left_out:
        click.echo(left_out)


# -- samples ----------------------------------------------------------------------------------

@main.group()
def sample() -> None:
    """Make sample datasets (nothing is downloaded)."""


@sample.command("scenes")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--replace", is_flag=True,
              help="Make other scenes over earlier ones in DIRECTORY (deleting them); refused "
                   "anyway where a dataset of the store was registered from them.")
@store_option
@user_errors
def sample_scenes(directory: Path, images: int, seed: int, replace: bool,
                  store_location: str) -> None:
    """Synthetic scenes with per-pixel ground truth: an ImageFolder under DIRECTORY.

    DIRECTORY must be new, empty, or hold scenes made by this command; other scenes are made
    over earlier ones only with --replace, and never over scenes a dataset of the store was
    registered from."""
    from labeler_service.scenes import SCENE_CLASSES, make_scenes

    try:
        store = Store.open(store_location, mode="r")
    except StoreError:
        store = None  # no store there: no dataset registered in it
    make_scenes(directory, images=images, seed=seed, store=store, replace=replace)
    click.echo(f"{images} scenes of {len(SCENE_CLASSES)} classes in {directory} (masks beside "
               f"the images: docs/scenes-format.md)")


# -- store ------------------------------------------------------------------------------------

@main.group("store")
def store_group() -> None:
    """Check the label store."""


@store_group.command("verify")
@store_option
@click.option("--repair", is_flag=True, help="Mark every completed shard that fails a check "
              "(an array that does not decode, labels missing) for labeling again; the next "
              "job for its label set rewrites it.")
@user_errors
def store_verify(store_location: str, repair: bool) -> None:
    """Decode and check every array of every completed shard; report missing shards, failed
    images and fingerprint mismatches; exit 1 if inconsistent (after --repair: if anything is
    left that labeling cannot fix)."""
    store = Store.open(store_location, mode="a" if repair else "r")
    if not echo_verify_report(store, click.echo, repair):
        raise SystemExit(1)


@main.command("import-tokenlabeling")
@click.argument("dataset")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@store_option
@click.option("--num-classes", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--model", default="dm_nfnet_f6", show_default=True,
              help="The teacher that made the files (recorded, not run).")
@click.option("--input-size", type=click.IntRange(1), default=576, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=DEFAULT_SHARD_SIZE,
              show_default=True)
@click.option("--ignore-dataset-classes", is_flag=True,
              help="Import even when --num-classes differs from the dataset's class count.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def import_tokenlabeling_cmd(dataset: str, directory: Path, store_location: str,
                             num_classes: int, model: str, input_size: int, shard_size: int,
                             ignore_dataset_classes: bool, progress: bool) -> None:
    """Import per-image TokenLabeling .pt files under DIRECTORY into a label set of DATASET."""
    from labeler_service.importer import import_tokenlabeling

    report = import_tokenlabeling(Store.open(store_location), dataset, directory,
                                  num_classes=num_classes, model=model, input_size=input_size,
                                  shard_size=shard_size, progress=progress,
                                  ignore_dataset_classes=ignore_dataset_classes)
    click.echo(f"label set {report.labelset_id}: {report.images_imported} images imported, "
               f"{sum(report.images_failed.values())} failed, {report.shards_written} shards "
               f"written, {report.shards_skipped} already done")
    click.echo(f"label files: {report.matched_full_path} found by the image path, "
               f"{report.matched_official} by the official rule (<class folder>/<name>.pt), "
               f"{report.images_without_file} images without one, {report.files_unmatched} "
               "files for no image")
    for status, count in sorted(report.images_failed.items()):
        click.echo(f"  {count} x {status.description}")


# -- service --------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="uvicorn worker processes.")
@user_errors
def api(host: str, port: int, workers: int) -> None:
    """Serve the REST API (settings from LABELER_* environment variables), with limits on
    request heads and connections (labeler_service/api/server.py)."""
    from labeler_service.api.server import serve
    from labeler_service.settings import get_settings

    get_settings().api_key_list()  # a key clients cannot send: one line now, not at start-up
    serve(host, port, workers)


@main.command()
@click.option("--gpu", type=click.IntRange(0), default=None,
              help="Pin this worker to GPU N (sets CUDA_VISIBLE_DEVICES=N). One worker per GPU.")
@click.option("--concurrency", type=click.IntRange(1), default=1, show_default=True,
              help="Task processes; keep 1 per GPU.")
@click.option("--name", default=None, help="Worker name (default: gpuN@host or cpu@host).")
@click.option("--queues", default="labeling,registration", show_default=True,
              help="Comma-separated queues: 'labeling' (shard tasks), 'registration' (dataset "
                   "scans). E.g. a CPU-only worker near the data for scans alone: "
                   "--queues registration.")
@click.option("--loglevel", default=None, help="Default: LABELER_LOG_LEVEL.")
def worker(gpu: int | None, concurrency: int, name: str | None, queues: str,
           loglevel: str | None) -> None:
    """Run a Celery worker on the labeling and registration queues (settings from LABELER_*
    variables)."""
    from labeler_service.queue import QUEUES

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if not chosen or unknown:
        raise click.BadParameter(f"queues must be among {', '.join(QUEUES)}; got {queues!r}",
                                 param_hint="--queues")
    if gpu is not None:
        # Before anything can initialise CUDA: the pool's children load the teacher lazily.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    # torch and timm (seconds to import) once, here, before the pool forks: a child, and each
    # replacement of one killed at the time limit, starts on its task at once. Importing them
    # does not initialise CUDA, so the children may still.
    import labeler_service.labeling  # noqa: F401
    from labeler_service.queue import configure
    from labeler_service.settings import get_settings
    from labeler_service.tasks import app  # registers the task bodies on the app

    settings = get_settings()
    configure(app, settings)
    hostname = name or (f"gpu{gpu}@%h" if gpu is not None else "cpu@%h")
    app.worker_main(["worker", "--pool=prefork", f"--concurrency={concurrency}",
                     "-Q", ",".join(chosen), f"--hostname={hostname}",
                     f"--loglevel={loglevel or settings.log_level}",
                     "--without-gossip", "--without-mingle"])


# -- quickstart -------------------------------------------------------------------------------

@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo"), show_default=True,
              help="Where the scenes, the teacher, the panels and the student go.")
@store_option
@click.option("--images", type=click.IntRange(50), default=None,
              help="Scenes to make (default: the quickstart's, 2500; at least 50, so the "
                   "student's batches of 32 fill from the 80 % not held out).")
@click.option("--teacher-epochs", type=click.IntRange(1), default=None,
              help="Default: the quickstart's (see BENCHMARKS.md).")
@click.option("--student-epochs", type=click.IntRange(1), default=None)
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def demo(directory: Path, store_location: str, images: int | None, teacher_epochs: int | None,
         student_epochs: int | None, progress: bool) -> None:
    """The quickstart: scenes with ground truth, a fitted teacher, labels scored against the
    masks, picture panels, and an LV-ViT trained on the token labels (about 8 minutes on 2
    CPU cores)."""
    from dataclasses import replace

    from labeler_service.demo import DemoConfig, run_demo

    config = replace(DemoConfig(), progress=progress)
    if images:
        config = replace(config, images=images)
    if teacher_epochs:
        config = replace(config, teacher_epochs=teacher_epochs)
    if student_epochs:
        config = replace(config, student_epochs=student_epochs)
    run_demo(directory, store_location, config, echo=click.echo)
