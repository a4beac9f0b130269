"""Consistency checks over a whole store (``labeler store verify``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from storage.errors import StoreError
from storage.labelset import ARRAY_NAMES, LabelSet
from storage.status import ImageStatus
from storage.store import Store


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)  # inconsistencies: exit non-zero
    notes: list[str] = field(default_factory=list)  # facts worth knowing (failed images)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_labelset(labelset: LabelSet, fingerprint: str, report: VerifyReport) -> None:
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
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        report.problems.append(f"{where}: {len(missing)} of {labelset.num_shards} shards "
                               f"missing ({shown})")
    failed = Counter(int(s) for s in status[status > 0])
    for code, count in sorted(failed.items()):
        report.notes.append(f"{where}: {count} images failed: {ImageStatus(code).description}")
    # A shard marked done must hold labels for every image it calls labeled.
    logits, classes = labelset.array("logits"), labelset.array("classes")
    for shard in sorted(set(range(labelset.num_shards)) - set(missing) - set(torn)):
        start, stop = labelset.shard_range(shard)
        labeled = status[start:stop] == ImageStatus.LABELED
        try:
            bad = labeled & (~np.isfinite(logits[start:stop]).all(axis=(1, 2, 3))
                             | (classes[start:stop] < 0).any(axis=(1, 2, 3)))
        except Exception as e:
            report.problems.append(f"{where}: shard {shard}: labels unreadable ({e})")
            continue
        if bad.any():
            report.problems.append(f"{where}: shard {shard}: {int(bad.sum())} images marked "
                                   "labeled have no labels")


def verify_store(store: Store) -> VerifyReport:
    report = VerifyReport()
    for name in store.dataset_names():
        try:
            dataset = store.dataset(name)
        except StoreError as e:
            report.problems.append(f"{name}: {e}")
            continue
        manifest = dataset.manifest()
        if len(manifest) != dataset.num_images:
            report.problems.append(f"{name}: manifest has {len(manifest)} rows, attrs say "
                                   f"{dataset.num_images}")
        if manifest.fingerprint() != dataset.fingerprint:
            report.problems.append(f"{name}: manifest fingerprint does not match its attrs")
        for labelset_id in dataset.labelset_ids():
            try:
                labelset = dataset.labelset(labelset_id)
            except (StoreError, KeyError) as e:
                report.problems.append(f"{name}/{labelset_id}: {e}")
                continue
            verify_labelset(labelset, dataset.fingerprint, report)
    return report
