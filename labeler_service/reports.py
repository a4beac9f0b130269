"""What the CLI prints after a command's work, line by line through an ``echo`` callable: shared
by ``labeler`` (``click.echo``) and the quickstart (``labeler demo``), which prints the same
reports between its steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from storage import Store
from storage.verify import verify_store

if TYPE_CHECKING:  # both import torch: ~4 s for `labeler datasets list`, which prints no report
    from labeler_service.labeling import LabelingReport
    from labeler_service.teacher_fit import FitReport

Echo = Callable[[str], None]


def echo_label_report(report: LabelingReport, store: Store, dataset: str, echo: Echo) -> None:
    failed = report.images_done - report.images_labeled
    rate = report.images_done / report.seconds if report.seconds else 0.0
    echo(f"label set {report.labelset_id}: {report.images_labeled} images labeled, "
         f"{failed} failed, {report.shards_written} shards written, "
         f"{report.shards_skipped} already done ({report.seconds:.1f} s, {rate:.1f} img/s)")
    for status, count in sorted(report.images_failed.items()):
        echo(f"  {count} x {status.description}")
    for path, reason in report.failures[:10]:
        echo(f"    {path}: {reason}")
    if report.agreement is not None:
        # Lazy: quality imports the teacher (torch), and only a labeling run gets here.
        from labeler_service.quality import describe_agreement

        echo(describe_agreement(report.agreement))
    echo(f"results: {store.location}/datasets/{dataset}/labels/{report.labelset_id}")


def echo_fit_report(report: FitReport, echo: Echo) -> None:
    how = "head only" if report.head_only else ("fine-tuned" if report.backbone else
                                                "from scratch")
    echo(f"{report.model} ({how}) on {report.dataset}: {len(report.class_names)} classes, "
         f"{report.train_images} training images, {report.images_failed} unreadable, "
         f"{report.seconds:.1f} s")
    if report.heldout_top1 is None:
        echo("held-out: no image held out (raise --val-permille to measure the teacher)")
    else:
        echo(f"held-out top-1 {100 * report.heldout_top1:.1f} %, top-5 "
             f"{100 * report.heldout_top5:.1f} % ({report.heldout_images} images)")


def echo_verify_report(store: Store, echo: Echo, repair: bool = False) -> bool:
    """``labeler store verify``'s report; whether the store is consistent (after ``repair``:
    whether all that is left is for labeling to fix)."""
    report = verify_store(store, repair)
    for note in report.notes:
        echo(f"note: {note}")
    for problem in report.problems:
        echo(f"problem: {problem}")
    shards = [r for r in report.repaired if r[1] >= 0]
    if shards:
        echo(f"repaired: {len(shards)} shards marked for labeling again; run the label job "
             "again to rewrite them")
    if len(shards) < len(report.repaired):
        echo(f"repaired: {len(report.repaired) - len(shards)} completion summaries rebuilt from "
             "the status records")
    if report.ok:
        echo("store is consistent")
    return report.ok or (repair and len(report.problems) == len(report.repaired))
