"""Who a command or a file operation runs as: E2B's ``user`` (uid 1000, home
``/home/user``) unless the call asks for ``root`` (``Authorization: Basic
base64("root:")`` on RPCs, ``?username=root`` on ``/files``).

The guest agent runs as root; a command for ``user`` carries ``RunAs(1000, 1000,
"user")`` (``user=`` of its spec) and the agent's child switches to it before its exec
(guest/runas.py: uid, gid and the user's groups, as ``setpriv --init-groups``), with
``HOME``, ``USER`` and ``LOGNAME`` set here. Agents of images built before that get the
command wrapped with ``setpriv`` instead (``CommandSpec.for_agent``).
"""

from __future__ import annotations

import base64
import binascii
import posixpath
from dataclasses import dataclass

from emberbox import errors
from emberbox.agent_client.spec import RunAs

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    home: str

    def run_as(self) -> RunAs | None:
        """A spec's ``user`` for this user (None: root, the agent's own)."""
        return None if self.uid == 0 else RunAs(self.uid, self.uid, self.name)

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
