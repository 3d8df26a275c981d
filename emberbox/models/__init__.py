"""Wire schemas shared by the HTTP API, the SDK and the CLI (pydantic v2), one module
per resource; every public name is re-exported here (``from emberbox.models import X``).

Request models (``*Create``, ``*Request``, ``*Update``) forbid unknown fields, so a typo
in a client is a 422 naming the field instead of a silently ignored option. Public
models (``*Public``, ``*Response``) are what the server sends; they never carry host
details (work directories, VMM pids) or secrets (the sandbox's environment).

These modules import pydantic and nothing of the server (the SDK installs without it):
building a public model from a service object is the API's job (``emberbox.api.views``).

- :mod:`.common`: base classes, constrained field types, wire bounds
- :mod:`.sandboxes`, :mod:`.snapshots`, :mod:`.execs`, :mod:`.processes`, :mod:`.files`,
  :mod:`.ports`
- :mod:`.events`: NDJSON stream events; :mod:`.errors`: the error body
- :mod:`.system` (health, images), :mod:`.audit`, :mod:`.compat` (the seed's endpoints)
- :mod:`.oneshot`: ``POST /v1/run`` (imported as ``emberbox.models.oneshot``)
"""

from __future__ import annotations

from emberbox.models.audit import AuditEntryPublic, AuditList
from emberbox.models.common import GuestPath, ObjectId
from emberbox.models.compat import CommandRequest, CommandResponse, VMCreate, VMCreateResponse
from emberbox.models.errors import ErrorBody, ErrorDetail
from emberbox.models.events import ErrorEvent, ExitEvent, OutputEvent, StreamEvent
from emberbox.models.execs import ExecLogEntryPublic, ExecLogList, ExecRequest, ExecResponse
from emberbox.models.files import (
    ArchiveWritten,
    FileEntry,
    FileList,
    FileType,
    FileWritten,
    MakeDir,
)
from emberbox.models.ports import PortPublic, PortUpdate
from emberbox.models.processes import (
    ProcessCreate,
    ProcessList,
    ProcessPublic,
    ProcessStarted,
    ProcessStatusPublic,
    PtySize,
    PtyTicket,
    SignalRequest,
    StdinWritten,
)
from emberbox.models.sandboxes import (
    NetworkRequest,
    SandboxCreate,
    SandboxList,
    SandboxPublic,
    SandboxStateName,
    TimeoutUpdate,
)
from emberbox.models.snapshots import SnapshotList, SnapshotPublic
from emberbox.models.system import Health, ImagePublic

__all__ = [
    "ArchiveWritten",
    "AuditEntryPublic",
    "AuditList",
    "CommandRequest",
    "CommandResponse",
    "ErrorBody",
    "ErrorDetail",
    "ErrorEvent",
    "ExecLogEntryPublic",
    "ExecLogList",
    "ExecRequest",
    "ExecResponse",
    "ExitEvent",
    "FileEntry",
    "FileList",
    "FileType",
    "FileWritten",
    "GuestPath",
    "Health",
    "ImagePublic",
    "MakeDir",
    "NetworkRequest",
    "ObjectId",
    "OutputEvent",
    "PortPublic",
    "PortUpdate",
    "ProcessCreate",
    "ProcessList",
    "ProcessPublic",
    "ProcessStarted",
    "ProcessStatusPublic",
    "PtySize",
    "PtyTicket",
    "SandboxCreate",
    "SandboxList",
    "SandboxPublic",
    "SandboxStateName",
    "SignalRequest",
    "SnapshotList",
    "SnapshotPublic",
    "StdinWritten",
    "StreamEvent",
    "TimeoutUpdate",
    "VMCreate",
    "VMCreateResponse",
]
