"""One run, several JAX processes (multi-host: a TPU slice, a multi-node SLURM job, or processes
on one machine).

Every process runs the same program. The jitted stages span the global mesh (`jaxdpo.sharding`),
and what the host decides (prompts, picks, label records, metrics) is computed from the same
values on every process. What must happen once happens on process 0, the *writer*: the run
folder's lock, its label log and metrics, the oracle (people are asked once, and every process
trains on the writer's labels). `from_writer` hands the writer's outcome — a value, or the
exception it raised — to every process, so all go on, or stop, together. Checkpoints are the one
exception: orbax saves a sharded array from every process that holds a shard.

With one process every function here is the plain call.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxdpo.errors import UserError

WRITER = 0
SHARED_CHECK = ".processes"
T = TypeVar("T")


def is_writer() -> bool:
    """Whether this process writes the run folder (process 0)."""
    return jax.process_index() == WRITER


def from_writer(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` run by the writer only; every process returns its result, or raises
    the exception it raised. The others wait for it: a synchronization point."""
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    if not is_writer():
        result, error = broadcast(None)
        if error is not None:
            raise error
        return result
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:
        broadcast((None, _portable(error)))
        raise
    broadcast((result, None))
    return result


def broadcast(value: T) -> T:
    """The writer's `value` (anything picklable) on every process; the others' `value` is ignored."""
    if jax.process_count() == 1:
        return value
    data = pickle.dumps(value) if is_writer() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.zeros(max(64, 1 << (size - 1).bit_length()), np.uint8)  # a few sizes: a few compiled broadcasts
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    received = multihost_utils.broadcast_one_to_all(buffer)
    return value if is_writer() else pickle.loads(received[:size].tobytes())


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on at least one process."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


@contextlib.contextmanager
def held_by_writer(context: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[None]:
    """`with context():` on the writer only (e.g. the run folder's lock); when entering it fails,
    every process raises the writer's error."""
    with contextlib.ExitStack() as stack:

        def enter() -> None:
            stack.enter_context(context())

        from_writer(enter)
        yield


def check_shared_folder(folder: Path) -> None:
    """Every process must see what the writer writes in `folder`: the run folder of a job over
    several hosts lives on a filesystem they all mount. The writer writes a fresh token to
    `folder/.processes` and every process reads it back; a process that does not see it stops
    the job with a UserError (instead of checkpoints that half the hosts cannot restore)."""
    if jax.process_count() == 1:
        return
    path = Path(folder) / SHARED_CHECK
    token = from_writer(_write_token, path)
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    if any_process(seen != token):
        raise UserError(
            f"{folder} is not the same folder for every process of this job ({jax.process_count()} processes): some do not see "
            f"the files process {WRITER} writes there. Put --out on a filesystem every host mounts (NFS, Lustre, ...)"
        )


def _write_token(path: Path) -> str:
    token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
    with path.open("w") as f:
        f.write(token)
        f.flush()
        os.fsync(f.fileno())
    return token


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception type may refuse pickling
        return RuntimeError(f"process {WRITER} failed: {type(error).__name__}: {error}")
