"""Errors raised by the store. Each carries a message a user can act on."""


class StoreError(Exception):
    """The store, or something in it, is missing, malformed or of an unknown format."""


class DatasetUnfinished(StoreError):
    """A dataset whose registration has not finished: in progress, paused between tasks, or
    interrupted. Registering it again finishes or replaces it."""


class DatasetChangedError(StoreError):
    """A dataset was registered again from a directory whose contents changed."""


class ShardUnreadable(StoreError):
    """A stored label array could not be decoded (a corrupt or truncated shard object).
    ``labeler store verify --repair`` marks such shards pending, so labeling rewrites them."""

    def __init__(self, labelset_id: str, array: str, shard: int, cause: BaseException):
        super().__init__(f"label set {labelset_id}: the {array!r} array of shard {shard} is "
                         f"unreadable ({type(cause).__name__}); `labeler store verify --repair` "
                         "marks it for labeling again")
        self.labelset_id, self.array, self.shard = labelset_id, array, shard


class LabelSetMismatchError(StoreError):
    """A label set exists under this id with a different configuration, or a write does not fit."""


class FolderChangedDuringScan(DatasetChangedError):
    """A file listed at the start of a registration was gone (or no longer a file) when it was
    hashed: the folder changed while it was scanned."""


class ManifestDamaged(StoreError):
    """A dataset's stored manifest columns contradict each other (path offsets out of order, a
    digest column of the wrong shape): what they would give is wrong, so nothing is served."""

    def __init__(self, dataset: str, problem: str):
        super().__init__(f"dataset {dataset!r}: the stored manifest is damaged ({problem}); "
                         "`labeler store verify` reports it, and the dataset must be registered "
                         "again")
        self.dataset, self.problem = dataset, problem
