"""Fixtures of the hostile suite: real servers per module, a bystander sandbox, and the
measurement row every case writes.

``server_factory`` starts servers (:func:`tests.support.hostile.hostile_server`: each
owns its ``emberbox serve`` and checks that nothing is left behind) for a whole module;
``server`` is one, with the module's ``SERVER_ENV``.
``bystander`` is a sandbox on it that must keep answering whatever the other guests do.
``hostile_case`` samples the host while a case runs and writes its row to the report
(``EMBERBOX_HOSTILE_REPORT``; its path is printed in the terminal summary).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emberbox.images.registry import ImageInfo
from tests.support.hostile import (
    Bystander,
    Case,
    HostileServer,
    hostile_server,
    put_acknowledged,
)
from tests.support.measure import Report, Sampler

_report: list[Report] = []


@pytest.fixture(scope="module")
def server_factory(default_image: ImageInfo) -> Iterator[Callable[..., HostileServer]]:
    """Starts servers (see :func:`hostile_server`) that live until the module ends."""
    with contextlib.ExitStack() as stack:

        def start(env: dict[str, str] | None = None, data_dir: Path | None = None) -> HostileServer:
            return stack.enter_context(hostile_server(env, data_dir))

        yield start


@pytest.fixture(scope="module")
def server(
    server_factory: Callable[..., HostileServer], request: pytest.FixtureRequest
) -> HostileServer:
    """One server for the module, started with the module's ``SERVER_ENV`` (if any)."""
    return server_factory(env=dict(getattr(request.module, "SERVER_ENV", {})))


@pytest.fixture(scope="module")
def bystander(server: HostileServer) -> Bystander:
    with server.client() as client:
        sandbox_id = server.create(client, metadata={"role": "bystander"})
        content = f"bystander {sandbox_id}\n".encode()
        put_acknowledged(client, sandbox_id, content)
    return Bystander(server, sandbox_id, content)


@pytest.fixture(scope="session")
def hostile_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    default = tmp_path_factory.getbasetemp() / "hostile-report.md"
    report = Report(Path(os.environ.get("EMBERBOX_HOSTILE_REPORT", default)))
    _report.append(report)
    return report


@pytest.fixture
def hostile_case(
    hostile_report: Report, server: HostileServer
) -> Callable[..., contextlib.AbstractContextManager[Case]]:
    """``with hostile_case(name, contained_by) as case:`` samples the host while the
    attack runs and writes the case's row (also when it fails)."""

    @contextlib.contextmanager
    def run(name: str, contained_by: str, on: HostileServer | None = None) -> Iterator[Case]:
        target = on or server  # (a test may point case.sampler at another server pid)
        sampler = Sampler(target.data_dir, target.pid)
        case = Case(name, contained_by, sampler)
        try:
            with sampler:
                yield case
        except BaseException as exc:
            case.outcome = f"FAILED: {type(exc).__name__}: {str(exc)[:120]}"
            raise
        finally:
            hostile_report.add(case.name, case.contained_by, case.outcome, sampler)

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for report in _report:
        terminalreporter.write_sep("-", "hostile suite report")
        terminalreporter.write_line(report.path.read_text())
        terminalreporter.write_line(f"hostile report written to {report.path}")
