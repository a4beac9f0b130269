"""Errors raised by the store. Each carries a message a user can act on."""


class StoreError(Exception):
    """The store, or something in it, is missing, malformed or of an unknown format."""


class DatasetChangedError(StoreError):
    """A dataset was registered again from a directory whose contents changed."""


class LabelSetMismatchError(StoreError):
    """A label set exists under this id with a different configuration, or a write does not fit."""
