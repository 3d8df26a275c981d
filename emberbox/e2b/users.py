"""Who a command or a file operation runs as: E2B's ``user`` (uid 1000, home
``/home/user``) unless the call asks for ``root`` (``Authorization: Basic
base64("root:")`` on RPCs, ``?username=root`` on ``/files``).

The guest agent runs everything as root; a command for ``user`` is wrapped with
``setpriv`` (as the one-shot runner wraps with ``RUN_AS``), with ``HOME``, ``USER`` and
``LOGNAME`` set, so no new agent feature is needed.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from emberbox import errors

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    home: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as this user."""
        if self.uid == 0:
            return list(argv)
        ids = [f"--reuid={self.uid}", f"--regid={self.uid}", "--init-groups"]
        return ["setpriv", *ids, "--", *argv]

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "PATH": PATH}

    def resolve(self, path: str | None) -> str:
        """``path`` made absolute against the home directory (None or "": the home)."""
        if not path:
            return self.home
        if "\0" in path:
            raise errors.InvalidRequest("a path cannot contain NUL")
        return posixpath.normpath(posixpath.join(self.home, path)).replace("//", "/")


USERS = {"user": User("user", 1000, "/home/user"), "root": User("root", 0, "/root")}
DEFAULT_USER = USERS["user"]


def named(name: str | None) -> User:
    if not name:
        return DEFAULT_USER
    user = USERS.get(name)
    if user is None:
        raise errors.InvalidRequest(f"unknown user {name!r}: use user or root")
    return user


def from_authorization(header: str | None) -> User:
    """The user of ``Authorization: Basic base64("name:")``; the default without one."""
    if not header:
        return DEFAULT_USER
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return DEFAULT_USER
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise errors.InvalidRequest("malformed Basic authorization") from None
    return named(decoded.partition(":")[0])
