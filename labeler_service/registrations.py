"""Dataset registrations: the long-running ``POST /v1/datasets``, its state in Redis.

Registering an image folder means listing, hashing and probing every file (ImageNet: 1.28 M files,
~140 GB): minutes, too long for an HTTP request. The API records a registration in Redis
(``labeler:registration:<name>``, one hash per dataset name) and queues the
``labeler.register_dataset`` task on its own queue; a worker scans the folder and writes the
dataset with ``Store.add_dataset``, the same call ``labeler datasets add`` makes in-process.

The store is the source of truth for registered datasets: a dataset in the store is ``ready``
whatever Redis says (or has lost). Redis holds only what is not in the store yet: a registration
in progress (``registering``, with its progress) or one that failed (``failed``, with the reason).
Finished records expire after the job TTL; by then the store says everything.

Each registration has an ``attempt`` id. The task carries it and does nothing (or stops) once the
record has another attempt: a re-POST that replaced a registration stuck since before the
visibility timeout, or one that failed, leaves the old task harmless.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from labeler_service import keys
from labeler_service.keys import now
from labeler_service.paths import PathOutsideRoot, is_kind, public_reason, resolve_inside
from storage import Dataset, DatasetChangedError, Store, StoreError
from storage.manifest import FileOutsideRoot, ScanPaused

STATES = ("registering", "ready", "failed")
PROGRESS_INTERVAL = 1.0  # seconds between progress writes (and heartbeats) to Redis

# Create a registration unless one for this name is in progress and alive. Returns the outcome
# followed by the record (HGETALL): "created"; "existing" (in progress from the same folder);
# "conflict" (in progress from another folder); "ready" (the record says ready: the caller asks
# the store, and passes force=1 to replace a record whose dataset the store does not hold). A
# failed registration, or one without a heartbeat for ARGV[6] seconds (lost: whatever its
# folder), is replaced.
_BEGIN = """
local function answer(outcome)
  local record = redis.call('HGETALL', KEYS[1])
  table.insert(record, 1, outcome)
  return record
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'registering' then
  local updated = tonumber(redis.call('HGET', KEYS[1], 'updated_at') or '0')
  if tonumber(ARGV[5]) - updated <= tonumber(ARGV[6]) then
    if redis.call('HGET', KEYS[1], 'directory') ~= ARGV[3] then return answer('conflict') end
    return answer('existing')
  end
elseif state == 'ready' and ARGV[7] ~= '1' then
  return answer('ready')
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'path', ARGV[2], 'directory', ARGV[3],
           'attempt', ARGV[4], 'state', 'registering', 'created_at', ARGV[5],
           'updated_at', ARGV[5], 'files_scanned', 0)
redis.call('SADD', KEYS[2], ARGV[1])
return answer('created')
"""
# Progress of the current attempt: 1 written, 0 superseded (another attempt, or no longer
# registering), -1 the record is gone (Redis emptied: go on, the store will say ready).
_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'registering' then return 0 end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2], 'files_scanned', ARGV[3],
           'files_total', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'started_at', ARGV[5]) end
return 1
"""
# The current attempt ends: ready or failed. 1 if it was still registering, else 0.
_FINISH = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'registering' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3], 'updated_at', ARGV[3],
           'error', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'files_scanned', ARGV[5], 'files_total', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
return 1
"""
# Drop a name from the index if its record is gone (expired): checked and removed in one step,
# so a registration created for that name meanwhile stays listed.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
"""
# Drop a registration this request created and could not queue (the broker refused the task).
_DISCARD = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


@dataclass
class Registration:
    name: str
    path: str  # as requested: relative to the data root
    directory: str  # resolved by the API (a dataset registered from it has it as source_root)
    attempt: str
    state: str
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    files_scanned: int = 0
    files_total: int | None = None  # None while the folder is still being listed

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Registration:
        def opt(key: str, kind: type) -> Any:
            return kind(h[key]) if h.get(key) else None

        return cls(name=h["name"], path=h["path"], directory=h["directory"],
                   attempt=h["attempt"], state=h["state"], created_at=float(h["created_at"]),
                   updated_at=float(h["updated_at"]), started_at=opt("started_at", float),
                   finished_at=opt("finished_at", float), error=h.get("error") or None,
                   files_scanned=int(h.get("files_scanned") or 0),
                   files_total=opt("files_total", int))


class RegistrationStore:
    """Registrations in Redis. ``stale_after``: seconds without a heartbeat after which a
    registration in progress is taken for lost (its task is gone) and a re-POST starts it again;
    the visibility timeout, since the task's time limit is below it."""

    INDEX = keys.REGISTRATION_INDEX

    def __init__(self, client: redis.Redis, ttl_seconds: int, stale_after: float):
        self.r = client
        self.ttl = ttl_seconds
        self.stale_after = stale_after
        self._begin = client.register_script(_BEGIN)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(_FINISH)
        self._discard = client.register_script(_DISCARD)
        self._forget = client.register_script(_FORGET)

    key = staticmethod(keys.registration)

    def begin(self, name: str, path: str, directory: Path,
              force: bool = False) -> tuple[str, Registration]:
        """Atomically create a registration, or find the one in progress: (outcome, the
        registration as it stands). Two concurrent calls for one name create one."""
        reply = self._begin(keys=[self.key(name), self.INDEX],
                            args=[name, path, str(directory), secrets.token_hex(8), now(),
                                  self.stale_after, "1" if force else "0"])
        outcome, flat = reply[0], reply[1:]
        return outcome, Registration.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))

    def record(self, name: str) -> Registration | None:
        """The registration as Redis holds it (what the task works from)."""
        h = self.r.hgetall(self.key(name))
        return Registration.from_hash(h) if h.get("attempt") else None

    def get(self, name: str) -> Registration | None:
        """The registration as clients see it: one in progress without a heartbeat for longer
        than ``stale_after`` is failed (lost), not registering for ever."""
        registration = self.record(name)
        return None if registration is None else self.as_seen(registration)

    def as_seen(self, registration: Registration) -> Registration:
        if registration.state == "registering" and (
                now() - registration.updated_at > self.stale_after):
            registration.state = "failed"
            registration.error = (
                f"lost: no progress for over {self.stale_after:.0f} s (its worker died, or the "
                "scan ran into the task time limit); POST it again to retry")
        return registration

    def all(self) -> list[Registration]:
        """Every registration Redis still holds (expired ones leave the index here)."""
        names = sorted(self.r.smembers(self.INDEX))
        pipe = self.r.pipeline()
        for name in names:
            pipe.hgetall(self.key(name))
        found = []
        for name, h in zip(names, pipe.execute() if names else [], strict=True):
            if h.get("attempt"):
                found.append(self.as_seen(Registration.from_hash(h)))
            else:
                self._forget(keys=[self.key(name), self.INDEX], args=[name])
        return found

    def progress(self, name: str, attempt: str, scanned: int, total: int | None,
                 started: bool = False) -> int:
        """1 written; 0 this attempt is superseded (stop); -1 the record is gone (go on)."""
        return self._progress(keys=[self.key(name)],
                              args=[attempt, now(), scanned, "" if total is None else total,
                                    now() if started else ""])

    def finish(self, name: str, attempt: str, state: str, error: str = "",
               num_images: int | None = None) -> bool:
        return bool(self._finish(keys=[self.key(name)],
                                 args=[attempt, state, now(), error,
                                       "" if num_images is None else num_images, self.ttl]))

    def discard(self, name: str, attempt: str) -> None:
        self._discard(keys=[self.key(name), self.INDEX], args=[attempt, name])


# -- the worker's side ---------------------------------------------------------------------------

class Superseded(Exception):
    """This attempt's registration was replaced (or failed) meanwhile: stop scanning."""


class ScanTooLong(Exception):
    """The folder could not even be listed (or no file hashed) before the task's deadline."""


# Failures that registering again will not fix without a change to the folder or the request.
PERMANENT = (PathOutsideRoot, StoreError, ValueError, PermissionError, FileNotFoundError,
             NotADirectoryError, ScanTooLong)


def describe(error: BaseException, data_root: Path, store_location: str | None = None) -> str:
    """The reason a failed registration shows: paths relative to the data root, the store's
    location hidden (clients see neither server path)."""
    if isinstance(error, DatasetChangedError | PathOutsideRoot | ScanTooLong):
        reason = str(error)
    elif isinstance(error, FileOutsideRoot):
        reason = f"refused: {error}"
    elif isinstance(error, OSError) and store_location and error.filename and \
            str(error.filename).startswith(str(store_location).rstrip("/")):
        reason = f"the store cannot be written ({error.strerror or type(error).__name__})"
    elif isinstance(error, PermissionError | FileNotFoundError | NotADirectoryError):
        reason = f"cannot read the folder: {error}"
    else:
        reason = f"{type(error).__name__}: {error}"
    return public_reason(reason, [data_root], store_location)


def run_registration(registrations: RegistrationStore, store: Store, data_root: Path,
                     name: str, attempt: str, time_limit: float | None = None,
                     clock=time.monotonic) -> str | None:
    """Scan and write one registration attempt (the body of ``labeler.register_dataset``).

    Returns the state it ended in ("ready", "failed"), "paused" when the scan reached the
    deadline (0.9 x ``time_limit``) with files left to hash: the rows hashed so far are in the
    store and the next task for this attempt goes on from them, so a folder of any size is
    registered in as many tasks as it takes. None when there was nothing to do (the record is
    gone, has another attempt or is no longer registering). A failure that registering again
    cannot fix marks the registration failed with the reason; anything else (Redis or the
    filesystem briefly unreachable) propagates, for the task to retry.
    """
    registration = registrations.record(name)  # a task queued for long is late, not lost
    if registration is None or registration.attempt != attempt:
        return None
    if registration.state != "registering":
        return None
    if registrations.progress(name, attempt, 0, None, started=True) == 0:
        return None
    began = clock()
    deadline = None if time_limit is None else began + max(1.0, time_limit * 0.9)
    last = began
    resumed: int | None = None  # files hashed before this task (the first count after listing)

    def heartbeat(scanned: int, total: int | None) -> None:
        nonlocal last, resumed
        if total is not None and resumed is None:
            resumed = scanned
        t = clock()
        if deadline is not None and t > deadline:
            if total is not None and resumed is not None and scanned > resumed:
                registrations.progress(name, attempt, scanned, total)
                raise ScanPaused(f"{scanned} of {total} files hashed")
            raise ScanTooLong(
                f"the folder could not be listed and a file hashed within "
                f"{time_limit * 0.9:.0f} s ({scanned} files hashed, of "
                f"{total if total is not None else 'an unknown number'}); raise "
                "LABELER_VISIBILITY_TIMEOUT (and LABELER_TASK_TIME_LIMIT, if set) and register "
                "it again")
        last_file = total is not None and scanned == total
        if t - last < PROGRESS_INTERVAL and not last_file:
            return
        last = t
        if registrations.progress(name, attempt, scanned, total) == 0:
            raise Superseded(name)

    try:
        # Re-resolved here, inside this worker's data root: the API's check is not trusted.
        directory = resolve_inside(data_root, registration.path)
        if not is_kind(directory, "dir"):
            raise NotADirectoryError(f"{registration.path!r} is not a directory under the data "
                                     "root")
        dataset, _ = store.add_dataset(name, directory, confine_to=data_root,
                                       progress=heartbeat, resume_key=attempt)
    except Superseded:
        return None
    except ScanPaused:
        return "paused"
    except PERMANENT as e:
        registrations.finish(name, attempt, "failed", describe(e, data_root, store.location))
        return "failed"
    registrations.finish(name, attempt, "ready", num_images=dataset.num_images)
    return "ready"


def ready_dataset(store: Store, name: str) -> Dataset | None:
    """The dataset if the store holds it complete (one being written has no attrs yet)."""
    try:
        return store.dataset(name)
    except (KeyError, StoreError):
        return None


def lookup(store: Store, registrations: RegistrationStore,
           name: str) -> Dataset | Registration | None:
    """The dataset if ready, else its registration (in progress or failed), else None."""
    dataset = ready_dataset(store, name)
    if dataset is not None:
        return dataset
    registration = registrations.get(name)
    if registration is not None and registration.state == "ready":
        # Written between the two reads (or removed from the store since): the store decides.
        return ready_dataset(store, name)
    return registration
