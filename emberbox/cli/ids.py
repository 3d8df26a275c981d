"""Ids as people type them: a unique prefix stands for the whole id, as with docker.

Every CLI command that takes a sandbox or snapshot id passes it through here first. An
exact id wins; otherwise the one id that starts with what was typed; an ambiguous prefix
is an error that lists the matches; no match is passed on unchanged, so the server
answers with its own NotFound.
"""

from __future__ import annotations

from collections.abc import Iterable

from emberbox import errors
from emberbox.sdk import Sandbox, Snapshots

SHOWN_MATCHES = 10


def match_prefix(given: str, known: Iterable[str], kind: str = "sandbox") -> str:
    """The id that ``given`` names among ``known``; raises InvalidRequest when several
    start with it.

    >>> match_prefix("a7", ["a72ea37", "b0c1"])
    'a72ea37'
    """
    ids = list(known)
    if given in ids or not given:
        return given
    matches = sorted(i for i in ids if i.startswith(given))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        return given
    shown = ", ".join(matches[:SHOWN_MATCHES]) + (", ..." if len(matches) > SHOWN_MATCHES else "")
    raise errors.InvalidRequest(
        f"{given!r} is the start of {len(matches)} {kind} ids ({shown}): type more of it"
    )


def sandbox_id(given: str, url: str | None, api_key: str | None) -> str:
    """The whole sandbox id that ``given`` (an id or a unique prefix) names."""
    return match_prefix(given, (s.id for s in Sandbox.list(url=url, api_key=api_key)))


def snapshot_id(given: str, url: str | None, api_key: str | None) -> str:
    """The whole snapshot id that ``given`` (an id or a unique prefix) names."""
    known = (s.id for s in Snapshots.list(None, url=url, api_key=api_key))
    return match_prefix(given, known, "snapshot")
