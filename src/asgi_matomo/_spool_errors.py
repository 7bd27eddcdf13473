"""What can be wrong with a spool file, and what to tell the user about it."""

from __future__ import annotations

import os
import sqlite3
from typing import Literal

__all__ = ["Problem", "SpoolError", "describe_error", "problem_of"]

# What keeps a spool file from being used, for the caller to decide what to do:
# "corrupt" files can be moved aside, "foreign"/"version" ones belong to someone
# else, "full"/"unwritable"/"locked" may pass, "directory"/"no_wal" need another path.
Problem = Literal[
    "corrupt", "foreign", "version", "full", "unwritable", "locked", "directory", "no_wal"
]

# SQLite's primary result codes (the low byte of an extended code).
_PROBLEM_OF_CODE: dict[int, Problem] = {
    3: "unwritable",  # SQLITE_PERM
    5: "locked",  # SQLITE_BUSY
    6: "locked",  # SQLITE_LOCKED
    8: "unwritable",  # SQLITE_READONLY
    10: "unwritable",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "full",  # SQLITE_FULL
    14: "unwritable",  # SQLITE_CANTOPEN
    26: "corrupt",  # SQLITE_NOTADB
}
# The same from the message, for Python 3.10 (no sqlite_errorcode attribute).
_PROBLEM_OF_MESSAGE: tuple[tuple[str, Problem], ...] = (
    ("malformed", "corrupt"),
    ("not a database", "corrupt"),
    ("disk is full", "full"),
    ("locked", "locked"),
    ("readonly", "unwritable"),
    ("unable to open", "unwritable"),
    ("disk i/o error", "unwritable"),
)


def problem_of(exc: BaseException) -> Problem | None:
    """What an exception says about the spool file, or None (a bug, a closed spool)."""
    if isinstance(exc, SpoolError):
        return exc.problem
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _PROBLEM_OF_CODE.get(code & 0xFF)
    reason = str(exc).lower()
    for needle, problem in _PROBLEM_OF_MESSAGE:
        if needle in reason:
            return problem
    return None


class SpoolError(ValueError):
    """The spool database cannot be opened or is not an asgi-matomo spool.

    A `ValueError`, with `problem` saying why (see `Problem`). The middleware
    raises it only for a `spool_path` that can never work (a directory); any
    other problem is logged and the file tried again (see `_spool_guard`).
    """

    def __init__(self, message: str, problem: Problem = "unwritable") -> None:
        super().__init__(message)
        self.problem: Problem = problem


def describe_error(path: str, exc: sqlite3.Error, *, busy_timeout: float) -> SpoolError:
    """The error to report for `exc` on the spool at `path`: what is wrong, what to do."""
    if os.path.isdir(path):
        return SpoolError(
            f"spool_path {path!r} is a directory: pass the path of a file in it, "
            f"e.g. {os.path.join(path, 'asgi-matomo-spool.sqlite3')!r}",
            "directory",
        )
    reason = str(exc)
    problem = problem_of(exc)
    if problem == "locked":
        return SpoolError(
            f"spool_path {path!r} stayed locked by another process for more than "
            f"{busy_timeout:g} s ({reason}): check that no other program keeps "
            "it open in a transaction (an sqlite3 shell, a backup tool)",
            "locked",
        )
    if problem == "corrupt":
        return SpoolError(
            f"spool_path {path!r} is not a usable SQLite database ({reason}): "
            "move the file away or pass another spool_path",
            "corrupt",
        )
    if problem == "full":
        return SpoolError(
            f"spool_path {path!r} cannot be written: the disk is full ({reason}): "
            "free some space on it or pass a spool_path on another disk",
            "full",
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return SpoolError(
            f"spool_path {path!r} cannot be opened for writing ({reason}): "
            f"{directory!r} is not an existing directory: create it (writable by the "
            "app's user) or pass another spool_path"
        )
    if _read_only_filesystem(directory):
        return SpoolError(
            f"spool_path {path!r} cannot be written ({reason}): it is on a read-only "
            "filesystem: mount it read-write or pass a spool_path on a writable disk"
        )
    return SpoolError(
        f"spool_path {path!r} cannot be opened for writing ({reason}): check that "
        "the app's user may write to its directory and the file (SQLite creates -wal "
        "and -shm files next to it)"
    )


def _read_only_filesystem(directory: str) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
