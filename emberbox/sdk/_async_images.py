"""The server's images, asyncio: :class:`AsyncImages`. Mirrors :mod:`emberbox.sdk._images`
call for call; requests and answers come from :mod:`emberbox.sdk._image_calls`."""

from __future__ import annotations

import builtins
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO

import anyio.to_thread
import httpx

from emberbox.models.images import BuildEvent
from emberbox.sdk import _calls
from emberbox.sdk import _image_calls as calls
from emberbox.sdk._calls import Call, ClientConfig
from emberbox.sdk._image_calls import ImageInfo
from emberbox.sdk._images import _outcome, keep

AsyncEventHandler = Callable[[BuildEvent], Awaitable[None] | None]


class AsyncImages:
    """Build, import, list and delete images (asyncio). See :class:`~emberbox.sdk.Images`."""

    @staticmethod
    async def build(
        context_dir: str | os.PathLike[str],
        dockerfile: str = "Dockerfile",
        *,
        name: str,
        build_args: dict[str, str] | None = None,
        no_cache: bool = False,
        on_event: AsyncEventHandler | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> ImageInfo:
        """See :meth:`Images.build`; ``on_event`` may be a coroutine function."""
        handle, inside = await anyio.to_thread.run_sync(
            calls.spooled_context, context_dir, dockerfile
        )
        try:
            size = handle.seek(0, os.SEEK_END)
            content = _async_chunks(handle)
            call = calls.build_call(name, inside, content, size, build_args, no_cache)
            await _stream_events(call, url, api_key, on_event)
        finally:
            handle.close()
        return await AsyncImages.get(name, url=url, api_key=api_key)

    @staticmethod
    async def import_(
        ref: str,
        *,
        name: str,
        on_event: AsyncEventHandler | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> ImageInfo:
        """See :meth:`Images.import_`."""
        await _stream_events(calls.import_call(ref, name), url, api_key, on_event)
        return await AsyncImages.get(name, url=url, api_key=api_key)

    @staticmethod
    async def list(
        *, url: str | None = None, api_key: str | None = None
    ) -> builtins.list[ImageInfo]:
        return calls.parse_images(await _send_once(calls.list_call(), url, api_key))

    @staticmethod
    async def get(name: str, *, url: str | None = None, api_key: str | None = None) -> ImageInfo:
        return calls.parse_image(await _send_once(calls.get_call(name), url, api_key))

    @staticmethod
    async def delete(name: str, *, url: str | None = None, api_key: str | None = None) -> int:
        response = await _send_once(calls.delete_call(name), url, api_key)
        return calls.parse_deleted(response).freed_bytes


async def _async_chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    handle.seek(0)
    while chunk := await anyio.to_thread.run_sync(handle.read, calls.CHUNK):
        yield chunk


async def _stream_events(
    call: Call, url: str | None, api_key: str | None, on_event: AsyncEventHandler | None
) -> BuildEvent:
    config = ClientConfig.resolve(url, api_key)
    last: BuildEvent | None = None
    try:
        async with (
            httpx.AsyncClient(**config.client_options()) as client,
            client.stream(**call.request_options()) as response,
        ):
            if response.status_code >= 400:
                await response.aread()
                raise _calls.error_from_response(response)
            async for line in response.aiter_lines():
                event = calls.parse_event(line)
                if event is None:
                    continue
                last = keep(last, event)
                if on_event is not None:
                    result = on_event(event)
                    if inspect.isawaitable(result):
                        await result
    except httpx.TransportError as exc:
        raise _calls.transport_error(exc, config) from exc
    return _outcome(last)


async def _send_once(call: Call, url: str | None, api_key: str | None) -> httpx.Response:
    config = ClientConfig.resolve(url, api_key)
    async with httpx.AsyncClient(**config.client_options()) as client:
        try:
            return await client.request(**call.request_options())
        except httpx.TransportError as exc:
            raise _calls.transport_error(exc, config) from exc
