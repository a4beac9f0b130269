"""Consistency checks over a whole store (``labeler store verify``): every array of every
completed shard is decoded and checked; ``--repair`` marks the shards that fail for labeling
again."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from storage.errors import DatasetUnfinished, ManifestDamaged, ShardUnreadable, StoreError
from storage.labelset import ARRAY_NAMES, LabelSet
from storage.status import ImageStatus
from storage.store import Store

SUMMARY = -1  # in VerifyReport.repaired: the completion summary, not a shard


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)  # inconsistencies: exit non-zero
    notes: list[str] = field(default_factory=list)  # facts worth knowing (failed images)
    repaired: list[tuple[str, int]] = field(default_factory=list)  # (label set, shard) reset;
    # shard SUMMARY: the label set's completion summary rebuilt

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_labelset(labelset: LabelSet, fingerprint: str, report: VerifyReport,
                    repair: bool = False) -> None:
    """Every check of one label set; with ``repair``, completed shards that fail them (and torn
    status objects) are marked pending, so the next labeling job rewrites them."""
    where = f"{labelset.dataset}/{labelset.id}"
    if labelset.dataset_fingerprint != fingerprint:
        report.problems.append(f"{where}: made for dataset fingerprint "
                               f"{labelset.dataset_fingerprint[:12]}, dataset now has "
                               f"{fingerprint[:12]}")
    for name in ARRAY_NAMES:
        if name not in labelset.group.array_keys():
            report.problems.append(f"{where}: array {name} missing")
            return
        if labelset.array(name).shape[0] != labelset.num_images:
            report.problems.append(f"{where}: {name} has {labelset.array(name).shape[0]} rows, "
                                   f"expected {labelset.num_images}")
            return
    status, torn = labelset.read_status()
    for shard in torn:
        report.problems.append(f"{where}: shard {shard}: status object unreadable (a torn "
                               "write); labeling again rewrites it")
    missing = [s for s in labelset.pending_shards(status) if s not in torn]
    recorded = labelset.completion()
    malformed = recorded is None and "completion" in labelset.attrs
    if malformed or (recorded is not None
                     and recorded != labelset.completion_from_status(status)):
        report.problems.append(f"{where}: the completion summary "
                               + ("is malformed" if malformed else
                                  "disagrees with the status records")
                               + ("; rebuilt" if repair else
                                  "; `labeler store verify --repair` rebuilds it"))
        if repair:
            labelset.rebuild_completion()
            report.repaired.append((labelset.id, SUMMARY))
    elif recorded is None and not missing and not torn:
        report.notes.append(f"{where}: complete; its completion summary is not recorded yet"
                            + (" (recorded)" if repair else ""))
        if repair:
            labelset.rebuild_completion()
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        report.problems.append(f"{where}: {len(missing)} of {labelset.num_shards} shards "
                               f"missing ({shown})")
    failed = Counter(int(s) for s in status[status > 0])
    for code, count in sorted(failed.items()):
        report.notes.append(f"{where}: {count} images failed: {describe_status(code)}")
    for shard in sorted(set(range(labelset.num_shards)) - set(missing) - set(torn)):
        problem = completed_shard_problem(labelset, shard)
        if problem:
            report.problems.append(f"{where}: shard {shard}: {problem}" + (
                "; marked for labeling again" if repair else
                "; `labeler store verify --repair` marks it for labeling again"))
            if repair:
                labelset.mark_pending(shard)
                report.repaired.append((labelset.id, shard))
    if repair:
        for shard in torn:
            labelset.mark_pending(shard)
            report.repaired.append((labelset.id, shard))


def completed_shard_problem(labelset: LabelSet, shard: int) -> str | None:
    """What is wrong with a shard marked done, or None: every array must decode with its
    shape, and every image it calls labeled must have top-K logits and classes (the lse too,
    unless the labels were imported, which have none)."""
    start, stop = labelset.shard_range(shard)
    try:
        block = labelset.read_block(start, stop)
    except ShardUnreadable as e:
        return f"the {e.array!r} array is unreadable"
    for name, spec in labelset.specs.items():
        if getattr(block, name).shape != (stop - start, *spec.shape):
            return f"the {name!r} array has shape {getattr(block, name).shape}"
    damaged = int(labelset.damaged(block).sum())
    if damaged:
        return f"{damaged} images marked labeled have no labels, or not all of them"
    return None


def describe_status(code: int) -> str:
    """A status code's description; a positive code this version does not know is a failure
    (docs/store-format.md), described as such rather than refused."""
    try:
        return ImageStatus(code).description
    except ValueError:
        return f"failure code {code}, unknown to this version"


def verify_store(store: Store, repair: bool = False) -> VerifyReport:
    report = VerifyReport()
    for name in store.dataset_names():
        try:
            dataset = store.dataset(name)
        except DatasetUnfinished as e:  # a registration under way is no inconsistency
            report.notes.append(str(e))
            continue
        except StoreError as e:
            report.problems.append(f"{name}: {e}")
            continue
        columns = dataset.group["manifest"]
        rows = {key: columns[key].shape[0] for key in columns.array_keys() if key != "path_utf8"}
        wrong = {key: n for key, n in rows.items() if n != dataset.num_images}
        if wrong:
            report.problems.append(f"{name}: manifest columns {wrong} rows, attrs say "
                                   f"{dataset.num_images}")
        else:
            try:  # chunk by chunk: verifying ImageNet-21k holds no whole manifest in memory
                if dataset.computed_fingerprint() != dataset.fingerprint:
                    report.problems.append(f"{name}: manifest fingerprint does not match its "
                                           "attrs")
            except ManifestDamaged as e:
                report.problems.append(str(e))
        for labelset_id in dataset.labelset_ids():
            try:
                labelset = dataset.labelset(labelset_id)
            except (StoreError, KeyError) as e:
                report.problems.append(f"{name}/{labelset_id}: {e}")
                continue
            verify_labelset(labelset, dataset.fingerprint, report, repair)
    return report
