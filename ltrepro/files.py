"""Files written atomically: to a temporary file beside the target, flushed to disk, then renamed
over it. A kill at any moment leaves the old file or the new one, never half of one, so a run
record or checkpoint is never torn."""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temp file in ``path``'s folder, fsync, and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path`` (created if absent, in an existing folder);
    released on exit and by the kernel when the process dies, so a killed holder never blocks anyone."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
