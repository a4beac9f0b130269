"""``labeler``: register datasets, label them in one process, check and import stores."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from storage import Store, StoreError
from storage.labelset import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE

if TYPE_CHECKING:
    from labeler_service.labeling import LabelingReport

store_option = click.option(
    "--store", "store_location", envvar="LABELER_STORE", default="store", show_default=True,
    help="Store path or fsspec URL (env LABELER_STORE).")


def user_errors(fn):
    """Turn the errors a user can fix into a one-line message and exit status 1."""
    from labeler_service.labeling import ClassCountMismatch
    from labeler_service.teacher import TeacherError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StoreError, TeacherError, ClassCountMismatch, ValueError, FileNotFoundError,
                NotADirectoryError, PermissionError) as e:
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


@datasets.command("list")
@store_option
@user_errors
def datasets_list(store_location: str) -> None:
    """List datasets and their label sets."""
    store = Store.open(store_location, mode="r")
    for name in store.dataset_names():
        dataset = store.dataset(name)
        click.echo(f"{name}\t{dataset.num_images} images\t{dataset.source_root}")
        for labelset_id in dataset.labelset_ids():
            labelset = dataset.labelset(labelset_id)
            done = labelset.num_shards - len(labelset.pending_shards())
            click.echo(f"  {labelset_id}\t{done}/{labelset.num_shards} shards")


# -- labeling ---------------------------------------------------------------------------------

@main.command()
@click.argument("dataset")
@click.option("--model", required=True, help="timm model name, e.g. dm_nfnet_f6.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local timm state dict (.pth/.pt/.bin) or .safetensors. Required unless "
                   "--random-weights.")
@click.option("--random-weights", is_flag=True,
              help="No checkpoint: random weights (speed tests only; labels are meaningless).")
@click.option("--input-size", type=click.IntRange(32, 2048), required=True,
              help="The whole image is resized to this square size.")
@click.option("--topk", type=click.IntRange(1, 1000), default=5, show_default=True)
@store_option
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Image decoding processes (default: on CUDA min(8, cores - 1); on CPU "
                   "cores / 4, at least 1, since the teacher uses every core).")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
              show_default=True, help="Autocast dtype on CUDA (the head and lse are always fp32).")
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
          input_size: int, topk: int, store_location: str, device: str, batch_size: int,
          workers: int | None, precision: str, shard_size: int, chunk_size: int | None, part: str,
          max_pixels: int | None, ignore_dataset_classes: bool, retry_failed: bool,
          progress: bool) -> None:
    """Label DATASET with a dense teacher, in this process (resumable)."""
    from labeler_service.images import DEFAULT_MAX_PIXELS
    from labeler_service.labeling import LabelingOptions, label_dataset, parse_part

    if (checkpoint is None) == (not random_weights):
        raise click.UsageError("give exactly one of --checkpoint FILE and --random-weights")
    options = LabelingOptions(batch_size=batch_size, num_workers=workers, device=device,
                              precision=precision,
                              max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                              shard_size=shard_size, chunk_size=chunk_size, progress=progress)
    store = Store.open(store_location)
    report = label_dataset(store, dataset, model, checkpoint, input_size, topk, options,
                           part=parse_part(part), ignore_dataset_classes=ignore_dataset_classes,
                           retry_failed=retry_failed)
    echo_label_report(report, store, dataset)
    if report.images_failed and not report.images_labeled:
        raise click.ClickException("no image could be labeled: the job failed as a whole")


def echo_label_report(report: LabelingReport, store: Store, dataset: str) -> None:
    failed = report.images_done - report.images_labeled
    rate = report.images_done / report.seconds if report.seconds else 0.0
    click.echo(f"label set {report.labelset_id}: {report.images_labeled} images labeled, "
               f"{failed} failed, {report.shards_written} shards written, "
               f"{report.shards_skipped} already done ({report.seconds:.1f} s, {rate:.1f} img/s)")
    for status, count in sorted(report.images_failed.items()):
        click.echo(f"  {count} x {status.description}")
    for path, reason in report.failures[:10]:
        click.echo(f"    {path}: {reason}")
    click.echo(f"results: {store.location}/datasets/{dataset}/labels/{report.labelset_id}")


# -- store ------------------------------------------------------------------------------------

@main.group("store")
def store_group() -> None:
    """Check the label store."""


@store_group.command("verify")
@store_option
@user_errors
def store_verify(store_location: str) -> None:
    """Report missing shards, failed images and fingerprint mismatches; exit 1 if inconsistent."""
    if not echo_verify_report(Store.open(store_location, mode="r")):
        raise SystemExit(1)


def echo_verify_report(store: Store) -> bool:
    from storage.verify import verify_store

    report = verify_store(store)
    for note in report.notes:
        click.echo(f"note: {note}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    if report.ok:
        click.echo("store is consistent")
    return report.ok


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
    for status, count in sorted(report.images_failed.items()):
        click.echo(f"  {count} x {status.description}")


# -- service --------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="uvicorn worker processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the REST API (settings from LABELER_* environment variables)."""
    import uvicorn

    uvicorn.run("labeler_service.api.main:create_app", factory=True, host=host, port=port,
                workers=workers, proxy_headers=True, log_level="info")


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
    from labeler_service.tasks import QUEUES

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if not chosen or unknown:
        raise click.BadParameter(f"queues must be among {', '.join(QUEUES)}; got {queues!r}",
                                 param_hint="--queues")
    if gpu is not None:
        # Before anything can initialise CUDA: the pool's children load the teacher lazily.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from labeler_service.settings import get_settings
    from labeler_service.tasks import app

    settings = get_settings()
    hostname = name or (f"gpu{gpu}@%h" if gpu is not None else "cpu@%h")
    app.worker_main(["worker", "--pool=prefork", f"--concurrency={concurrency}",
                     "-Q", ",".join(chosen), f"--hostname={hostname}",
                     f"--loglevel={loglevel or settings.log_level}",
                     "--without-gossip", "--without-mingle"])


# -- quickstart -------------------------------------------------------------------------------

@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("sample"), show_default=True,
              help="Where to make the sample images and checkpoint.")
@store_option
@user_errors
def demo(directory: Path, store_location: str) -> None:
    """Make a small sample dataset and teacher, register and label it, show the results."""
    from labeler_service.labeling import LabelingOptions, label_dataset
    from labeler_service.sample import SAMPLE_CLASSES, make_random_checkpoint, make_sample_images

    images = make_sample_images(directory / "images")
    checkpoint = make_random_checkpoint(directory / "test_nfnet.safetensors",
                                        num_classes=len(SAMPLE_CLASSES))
    click.echo(f"sample images in {images}, random-weight test_nfnet teacher in {checkpoint}")
    store = Store.open(store_location)
    dataset, created = store.add_dataset("sample", images)
    click.echo(f"sample: {'registered' if created else 'already registered'}: "
               f"{dataset.num_images} images, {len(dataset.class_names)} classes")
    options = LabelingOptions(batch_size=16, num_workers=2, shard_size=16, chunk_size=16)
    report = label_dataset(store, "sample", "test_nfnet", checkpoint, 160, 3, options)
    echo_label_report(report, store, "sample")
    if not echo_verify_report(store):
        raise SystemExit(1)
