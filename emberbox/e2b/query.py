"""Pure helpers of the control plane: the list query (E2B's triple-encoded metadata
filter, states, order, ``startedAfter``, paging), times, and the reserved metadata key
where emberbox keeps a sandbox's E2B data (no I/O).

The E2B data (envdAccessToken, clientID, templateID) lives in the sandbox's own metadata
under :data:`RESERVED_KEY`: it is written once at create, persists with the sandbox
across server restarts with nothing new in the store, and goes when the sandbox goes.
Neither the native API nor the E2B front ever shows that key (:func:`public_metadata`),
and callers cannot set it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar
from urllib.parse import parse_qsl, unquote

from emberbox.service.sandboxes.reserved import RESERVED_PREFIX, public_metadata
from emberbox.service.tenancy.access import LOCAL_TENANT_ID

__all__ = ["RESERVED_KEY", "RESERVED_PREFIX", "E2bData", "QueryError", "public_metadata"]

RESERVED_KEY = RESERVED_PREFIX + "e2b"  # metadata key of the E2B data; never shown
MAX_PAGE = 100
DEFAULT_PAGE = 100


class QueryError(ValueError):
    """A list query that cannot be read (answered 400)."""


@dataclass(frozen=True)
class E2bData:
    """What E2B says of a sandbox beyond emberbox's own record, and who made it: envd
    calls carry only the sandbox's token, so they are rate limited (``key_id``'s bucket)
    and audited (as ``tenant_id``) on behalf of the creator."""

    token: str
    client_id: str
    template_id: str
    tenant_id: str = LOCAL_TENANT_ID
    key_id: str | None = None  # the creating key; None in local mode (no rate limit)

    def encode(self) -> str:
        value = {"t": self.token, "c": self.client_id, "tpl": self.template_id}
        return json.dumps({**value, "tn": self.tenant_id, "k": self.key_id})

    @classmethod
    def decode(cls, metadata: Mapping[str, str]) -> E2bData | None:
        """The data kept in ``metadata``; None for a sandbox not made through E2B."""
        raw = metadata.get(RESERVED_KEY)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            key = value.get("k")
            return cls(
                str(value["t"]),
                str(value["c"]),
                str(value["tpl"]),
                str(value.get("tn") or LOCAL_TENANT_ID),
                str(key) if key is not None else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def decode_metadata_filter(value: str) -> dict[str, str]:
    """E2B's ``metadata`` query value (already URL-decoded once by the server):
    ``parse_qsl`` it, then ``unquote`` each key and value.

    >>> decode_metadata_filter("a%2520b=c%2526d&x=y")
    {'a b': 'c&d', 'x': 'y'}
    """
    pairs = parse_qsl(value, keep_blank_values=True)
    return {unquote(k): unquote(v) for k, v in pairs}


def parse_states(value: str | None) -> set[str]:
    """``state=running,paused``: the states asked for (both when absent)."""
    if value is None or not value.strip():
        return {"running", "paused"}
    states = {part.strip() for part in value.split(",") if part.strip()}
    unknown = states - {"running", "paused"}
    if unknown:
        raise QueryError(f"unknown state {sorted(unknown)[0]!r}: use running or paused")
    return states


def parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    try:
        limit = int(value)
    except ValueError:
        raise QueryError(f"limit must be an integer (got {value!r})") from None
    if not 1 <= limit <= MAX_PAGE:
        raise QueryError(f"limit must be from 1 to {MAX_PAGE} (got {limit})")
    return limit


def parse_time(value: str) -> datetime:
    """An RFC 3339 time with an offset (``Z`` too)."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise QueryError(f"not an RFC 3339 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise QueryError(f"the time {value!r} needs an offset")
    return parsed


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o{offset}".encode()).decode().rstrip("=")


def decode_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if text.startswith("o") and text[1:].isdigit():
            return int(text[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise QueryError("invalid nextToken")


T = TypeVar("T")


def page(items: Sequence[T], token: str | None, limit: int) -> tuple[list[T], str | None]:
    """One page of ``items`` and the token of the next (None on the last page)."""
    start = decode_token(token)
    chunk = list(items[start : start + limit])
    more = start + limit < len(items)
    return chunk, encode_token(start + limit) if more else None
