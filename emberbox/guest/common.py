"""What the guest agent's modules share: error answers, request fields, logging.

Standard library only. A handler raises :class:`RequestError` (or a subclass) to answer
with an error whose ``type`` names a class of ``emberbox.errors``; anything else it
raises is a bug, answered as ``AgentError``. The field parsers raise BadRequest.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import os
import sys
from typing import Any, TypeVar

T = TypeVar("T")


def log(message: str) -> None:
    """A line on the agent's stderr (the VM console in the guest)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"emberbox-agent: {message}", file=sys.stderr, flush=True)


class RequestError(Exception):
    """A request the agent answers with an error; `kind` is the wire error type."""

    kind = "AgentError"


class BadRequest(RequestError):
    """Bad fields, or an archive member that is refused."""

    kind = "InvalidRequest"


class Missing(RequestError):
    """No such pid or path."""

    kind = "NotFound"


class Clash(RequestError):
    """The object's state forbids the call (the process has already exited, ...)."""

    kind = "Conflict"


_ERRNO_KINDS: dict[int, type[RequestError]] = {
    errno.ENOENT: Missing,
    errno.ENOTDIR: Missing,
    errno.EEXIST: Clash,
    errno.ENOTEMPTY: Clash,
    errno.EBUSY: Clash,
    errno.EISDIR: BadRequest,
    errno.EINVAL: BadRequest,
    errno.ENAMETOOLONG: BadRequest,
    errno.ELOOP: BadRequest,
    errno.EXDEV: BadRequest,
}


def os_error(exc: OSError, path: str) -> RequestError:
    """An OSError on `path` as the answer it deserves: strerror and the guest's path
    (the one the error names, if it names one: rmtree fails on some file inside)."""
    cls = _ERRNO_KINDS.get(exc.errno or 0, RequestError)
    where = exc.filename if isinstance(exc.filename, str) else path
    if isinstance(exc.filename2, str):
        where = f"{where} -> {exc.filename2}"
    return cls(f"{exc.strerror or exc}: {where}")


def opt(req: dict[str, Any], name: str, kind: type[T]) -> T | None:
    value = req.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{name!r} must be {kind.__name__} or null")
    return value


def opt_bool(req: dict[str, Any], name: str, default: bool) -> bool:
    value = opt(req, name, bool)
    return default if value is None else value


def opt_b64(req: dict[str, Any], name: str) -> bytes | None:
    text = opt(req, name, str)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{name!r} is not valid base64: {exc}") from exc


def opt_number(req: dict[str, Any], name: str) -> float | None:
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadRequest(f"{name!r} must be a non-negative number or null")
    return float(value)


def opt_count(req: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    """An optional integer of at least `minimum`."""
    value = opt(req, name, int)
    if value is not None and value < minimum:
        raise BadRequest(f"{name!r} must be at least {minimum}")
    return value


def count(req: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = opt_count(req, name, minimum)
    if value is None:
        raise BadRequest(f"{name!r} is required")
    return value


def str_map(req: dict[str, Any], name: str) -> dict[str, str]:
    value = req.get(name) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name!r} must be an object of strings")
    return value


def guest_path(req: dict[str, Any], name: str = "path") -> str:
    """A required path, made absolute: relative paths are relative to /."""
    value = opt(req, name, str)
    if not value:
        raise BadRequest(f"{name!r} must be a non-empty string")
    if "\0" in value:
        raise BadRequest(f"{name!r} must not contain NUL bytes")
    return os.path.join("/", value)
