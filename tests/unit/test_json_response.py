"""A non-streamed exec answer is encoded as it is sent (issue #15): the same bytes as
FastAPI's JSONResponse, without ever holding the whole body."""

from __future__ import annotations

import asyncio
import tracemalloc

from fastapi.encoders import jsonable_encoder
from starlette.responses import JSONResponse

from emberbox.api.streams import json_response
from emberbox.models.execs import ExecResponse


async def _body(model: ExecResponse) -> list[bytes]:
    chunks: list[bytes] = []

    async def write(data: bytes) -> None:
        chunks.append(data)

    await json_response(model).produce(write)
    return chunks


def test_the_bytes_are_fastapis() -> None:
    """Long and short strings, escapes, non-ASCII, null and numbers: identical JSON."""
    output = bytes(300_000).decode() + 'é"\\\n\x7f' + "x" * 70_000
    model = ExecResponse(exit_code=3, stdout=output, stderr="é", duration_ms=1.5, signal=None)
    body = b"".join(asyncio.run(_body(model)))
    assert body == JSONResponse(content=jsonable_encoder(model)).body


def test_16_mib_of_nul_bytes_never_sit_in_memory_as_json() -> None:
    """16 MiB of NUL output is 96 MiB of JSON; encoding it costs a slice at a time
    (JSONResponse peaks at ~224 MiB for the same answer)."""
    model = ExecResponse(exit_code=0, stdout=bytes(16 << 20).decode(), stderr="", duration_ms=1)
    tracemalloc.start()
    try:
        sent = 0

        async def write(data: bytes) -> None:
            nonlocal sent
            sent += len(data)

        asyncio.run(json_response(model).produce(write))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent > 6 * (16 << 20)  # every NUL byte went out as \\u0000
    assert peak < 8 << 20
