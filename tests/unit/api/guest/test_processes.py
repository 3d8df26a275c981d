"""Background processes over HTTP: start, list, status, output, stdin, signals, resize and
forget; and the OpenAPI document of the process, file and stream routes."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from tests.support.api_calls import error_message, ndjson_events, new_sandbox, start_process
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio


async def test_process_start_list_status_and_output(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """A started process is listed, has a status, and its output replays as NDJSON."""
    sandbox_id = await new_sandbox(client)
    pid = await start_process(client, sandbox_id, cmd=["echo", "hi"], env={"A": "1"})
    guest = manager.guests[sandbox_id]
    assert guest.processes[pid].env == {"FROM_SANDBOX": "1", "A": "1"}
    listed = (await client.get(f"/v1/sandboxes/{sandbox_id}/processes")).json()["processes"]
    assert [(p["pid"], p["cmd"], p["running"], p["pty"]) for p in listed] == [
        (pid, "echo hi", False, False)
    ]
    status = (await client.get(f"/v1/sandboxes/{sandbox_id}/processes/{pid}")).json()
    assert (status["running"], status["exit_code"]) == (False, 0)
    events = ndjson_events(await client.get(f"/v1/sandboxes/{sandbox_id}/processes/{pid}/output"))
    assert [e["type"] for e in events] == ["stdout", "stderr", "exit"]
    assert events[0]["data"] == "ran echo hi\n"
    assert events[2]["exit_code"] == 0


async def test_follow_stdin_and_signal(client: httpx.AsyncClient) -> None:
    """Output is followed live while stdin feeds the process; closing stdin ends it; a
    signal ends another."""
    sandbox_id = await new_sandbox(client)
    base = f"/v1/sandboxes/{sandbox_id}/processes"
    pid = await start_process(client, sandbox_id, cmd="cat")
    followed: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            followed.append(await client.get(f"{base}/{pid}/output", params={"follow": "true"}))

        tg.start_soon(follow)
        await anyio.sleep(0.05)
        written = await client.post(f"{base}/{pid}/stdin", content=b"one\n")
        assert written.json() == {"written": 4}
        done = await client.post(f"{base}/{pid}/stdin", params={"close": "true"}, content=b"two")
        assert done.json() == {"written": 3}
    events = ndjson_events(followed[0])
    assert "".join(e.get("data", "") for e in events) == "one\ntwo"
    assert events[-1]["type"] == "exit"
    sleeper = await start_process(client, sandbox_id, cmd="sleep 100")
    signalled = await client.post(f"{base}/{sleeper}/signal", json={"signal": "SIGKILL"})
    assert signalled.status_code == 204
    status = (await client.get(f"{base}/{sleeper}")).json()
    assert (status["running"], status["exit_code"], status["signal"]) == (False, 137, 9)
    error_message(await client.post(f"{base}/{sleeper}/signal", json={}), 409, "Conflict")


async def test_output_without_follow_ends_after_the_buffer(client: httpx.AsyncClient) -> None:
    """follow=false on a running process: the buffered output, no exit event."""
    sandbox_id = await new_sandbox(client)
    base = f"/v1/sandboxes/{sandbox_id}/processes"
    pid = await start_process(client, sandbox_id, cmd="cat")
    await client.post(f"{base}/{pid}/stdin", content=b"kept")
    started = time.monotonic()
    events = ndjson_events(await client.get(f"{base}/{pid}/output", params={"follow": "false"}))
    assert events == [{"type": "stdout", "data": "kept"}]
    assert time.monotonic() - started < 5
    assert (await client.get(f"{base}/{pid}")).json()["running"] is True


async def test_resize_forget_and_refusals(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """resize needs a terminal (409); forget needs an ended process (409), then 404;
    unknown pids are 404, bad ones 422, a stopped sandbox 409."""
    sandbox_id = await new_sandbox(client)
    base = f"/v1/sandboxes/{sandbox_id}/processes"
    plain = await start_process(client, sandbox_id, cmd="sleep 9")
    term = await start_process(client, sandbox_id, cmd="sh", pty={"cols": 80, "rows": 24})
    error_message(
        await client.post(f"{base}/{plain}/resize", json={"cols": 10, "rows": 5}), 409, "Conflict"
    )
    assert (
        await client.post(f"{base}/{term}/resize", json={"cols": 132, "rows": 43})
    ).status_code == 204
    assert manager.guests[sandbox_id].processes[term].pty == (132, 43)
    error_message(
        await client.post(f"{base}/{term}/resize", json={"cols": 0, "rows": 5}),
        422,
        "ValidationError",
    )
    error_message(await client.delete(f"{base}/{plain}"), 409, "Conflict")
    await client.post(f"{base}/{plain}/signal", json={"signal": 15})
    assert (await client.delete(f"{base}/{plain}")).status_code == 204
    error_message(await client.get(f"{base}/{plain}"), 404, "NotFound")
    error_message(await client.get(f"{base}/{plain}/output"), 404, "NotFound")
    error_message(await client.get(f"{base}/0"), 422, "ValidationError")
    error_message(
        await client.post(f"{base}/{term}/signal", json={"signal": "rm -rf"}),
        422,
        "ValidationError",
    )
    error_message(await client.post(base, json={"cmd": []}), 422, "ValidationError")
    error_message(
        await client.post(base, json={"cmd": "x", "pty": {"cols": 5}}), 422, "ValidationError"
    )
    error_message(
        await client.post("/v1/sandboxes/nope/processes", json={"cmd": "x"}), 404, "NotFound"
    )
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    error_message(await client.get(base), 409, "Conflict")
    error_message(await client.post(base, json={"cmd": "x"}), 409, "Conflict")


# --- OpenAPI -----------------------------------------------------------------------------


async def test_openapi_lists_the_new_routes(client: httpx.AsyncClient) -> None:
    """The process and file routes are documented, streams with their media types."""
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    base = "/v1/sandboxes/{sandbox_id}"
    assert set(paths[f"{base}/processes"]) == {"get", "post"}
    assert set(paths[f"{base}/processes/{{pid}}"]) == {"get", "delete"}
    for action in ("output", "stdin", "signal", "resize"):
        assert f"{base}/processes/{{pid}}/{action}" in paths
    assert set(paths[f"{base}/files"]) == {"get", "put", "delete"}
    assert set(paths[f"{base}/archive"]) == {"get", "put"}
    assert {f"{base}/files/mkdir", f"{base}/files/stat"} <= set(paths)
    output = paths[f"{base}/processes/{{pid}}/output"]["get"]["responses"]
    assert "application/x-ndjson" in output["200"]["content"]
    assert "application/x-ndjson" in paths[f"{base}/exec"]["post"]["responses"]["200"]["content"]
    assert "413" in paths[f"{base}/files"]["put"]["responses"]
    assert "application/x-tar" in paths[f"{base}/archive"]["get"]["responses"]["200"]["content"]
    assert {"OutputEvent", "ExitEvent", "ErrorEvent"} <= set(spec["components"]["schemas"])
