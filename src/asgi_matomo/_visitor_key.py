"""Where the visitor-id key comes from: the option, the environment, or a per-host file.

Every process that tracks the same site must hash with the same key, or one
visitor becomes one visitor per worker. An explicit key (the `visitor_key`
option, else `ASGI_MATOMO_VISITOR_KEY`) is the only way to agree across hosts.
Without one, the first worker of a host writes a random key to a file of its
user's own in the system temp directory and every later worker reads it; if
that cannot be done safely, the process uses a key of its own and says so once.
The key itself is never logged nor put in an error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping

logger = logging.getLogger("asgi_matomo")

ENV_VAR = "ASGI_MATOMO_VISITOR_KEY"
MIN_KEY_LENGTH = 16
KEY_FILE_PREFIX = "asgi-matomo-visitor-key"
_KEY_BYTES = 32
_KEY_TEXT = re.compile(r"[0-9a-f]{64}")
# Larger than a key file: anything longer is not one of ours.
_READ_LIMIT = 256
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_HOW_TO_SET = (
    f"set {ENV_VAR} (or the visitor_key option) to the same secret in every process, "
    "e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))'"
)


def visitor_key(
    option: object, environ: Mapping[str, str] | None = None, directory: str | None = None
) -> bytes:
    """The secret for visitor ids: the option, else the environment, else the host's file."""
    if option is not None:
        return _explicit("visitor_key", option)
    value = (os.environ if environ is None else environ).get(ENV_VAR)
    if value:
        return _explicit(ENV_VAR, value)
    return host_key(directory)


def _explicit(name: str, value: object) -> bytes:
    # Errors name the setting and never show the value: it is a secret.
    if isinstance(value, str):
        raw = value.strip().encode("utf-8", "surrogatepass")
    elif isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raise TypeError(f"{name} must be a string or bytes, got {type(value).__name__}")
    if len(raw) < MIN_KEY_LENGTH:
        raise ValueError(
            f"{name} must be a secret of at least {MIN_KEY_LENGTH} characters: {_HOW_TO_SET}"
        )
    return raw


def key_file(directory: str | None = None) -> str:
    """The per-user key file of this host."""
    getuid = getattr(os, "getuid", None)
    owner = str(getuid()) if getuid is not None else "user"
    return os.path.join(directory or tempfile.gettempdir(), f"{KEY_FILE_PREFIX}-{owner}")


def host_key(directory: str | None = None) -> bytes:
    """The key every worker of this host shares, or a key of this process's own."""
    path = key_file(directory)
    try:
        return _read_or_create(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        logger.warning(
            "asgi_matomo: no shared visitor-id key in %s (%s), so this process uses a key of "
            "its own and each worker process counts the same visitor again; %s",
            path,
            reason,
            _HOW_TO_SET,
        )
        return secrets.token_bytes(_KEY_BYTES)


def _read_or_create(path: str) -> bytes:
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    # Written whole under a private name, then linked into place: link() fails if
    # another worker got there first, and nobody ever reads a half-written key.
    temporary = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(_KEY_BYTES) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return _read(path)


def _read(path: str) -> bytes:
    # The temp directory is shared: a file someone else planted, or could read,
    # would make the ids predictable. Not following links, checked on the open file.
    descriptor = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        getuid = getattr(os, "getuid", None)
        if getuid is not None and info.st_uid != getuid():
            raise ValueError("owned by another user; remove it")
        if info.st_mode & 0o077:
            raise ValueError("readable by other users; remove it")
        data = os.read(descriptor, _READ_LIMIT)
    finally:
        os.close(descriptor)
    text = data.decode("ascii", "replace").strip()
    if not _KEY_TEXT.fullmatch(text):
        raise ValueError("not a key file written by asgi-matomo; remove it")
    return bytes.fromhex(text)
