"""The server's images, blocking: :class:`Images`. Mirrors :mod:`emberbox.sdk._async_images`
call for call; requests and answers come from :mod:`emberbox.sdk._image_calls`."""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable

import httpx

from emberbox import errors
from emberbox.models.images import BuildEvent
from emberbox.sdk import _calls
from emberbox.sdk import _image_calls as calls
from emberbox.sdk._calls import Call, ClientConfig
from emberbox.sdk._image_calls import ImageInfo

EventHandler = Callable[[BuildEvent], None]


class Images:
    """Build, import, list and delete images. ``url`` and ``api_key`` as for
    :class:`~emberbox.sdk.Sandbox`.

    >>> Images.build("./grader", name="grader", on_event=print)
    >>> Sandbox.create(image="grader")
    """

    @staticmethod
    def build(
        context_dir: str | os.PathLike[str],
        dockerfile: str = "Dockerfile",
        *,
        name: str,
        build_args: dict[str, str] | None = None,
        no_cache: bool = False,
        on_event: EventHandler | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> ImageInfo:
        """Build image ``name`` from ``dockerfile`` and the files of ``context_dir``
        (``.dockerignore`` honoured; tarred here, built on the server in microVMs).
        ``on_event`` gets every :class:`BuildEvent` (steps, RUN output) as it comes.
        A failed step raises ImageBuildError (``details``: ``step``, ``exit_code``,
        ``log``); nothing is registered then."""
        handle, inside = calls.spooled_context(context_dir, dockerfile)
        with handle:
            size = handle.seek(0, os.SEEK_END)
            call = calls.build_call(name, inside, calls.chunks(handle), size, build_args, no_cache)
            _stream_events(call, url, api_key, on_event)
        return Images.get(name, url=url, api_key=api_key)

    @staticmethod
    def import_(
        ref: str,
        *,
        name: str,
        on_event: EventHandler | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> ImageInfo:
        """Import the OCI image ``ref`` (``docker://host/repo:tag``, ``host:port/repo:tag``;
        the operator also ``oci:DIR``, ``oci-archive:FILE``, ``docker-archive:FILE`` on
        the server) as ``name``."""
        _stream_events(calls.import_call(ref, name), url, api_key, on_event)
        return Images.get(name, url=url, api_key=api_key)

    @staticmethod
    def list(*, url: str | None = None, api_key: str | None = None) -> builtins.list[ImageInfo]:
        """Your images, then the operator's shared ones, with what uses each."""
        return calls.parse_images(_send_once(calls.list_call(), url, api_key))

    @staticmethod
    def get(name: str, *, url: str | None = None, api_key: str | None = None) -> ImageInfo:
        """One image; NotFound for a name you cannot see."""
        return calls.parse_image(_send_once(calls.get_call(name), url, api_key))

    @staticmethod
    def delete(name: str, *, url: str | None = None, api_key: str | None = None) -> int:
        """Delete an image; Conflict while a sandbox or snapshot uses it. Returns the
        bytes the server freed."""
        return calls.parse_deleted(_send_once(calls.delete_call(name), url, api_key)).freed_bytes


def _stream_events(
    call: Call, url: str | None, api_key: str | None, on_event: EventHandler | None
) -> BuildEvent:
    """Send ``call`` and pass its NDJSON events on; the ``done`` event, or the error."""
    config = ClientConfig.resolve(url, api_key)
    last: BuildEvent | None = None
    try:
        with (
            httpx.Client(**config.client_options()) as client,
            client.stream(**call.request_options()) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _calls.error_from_response(response)
            for line in response.iter_lines():
                event = calls.parse_event(line)
                if event is None:
                    continue
                last = keep(last, event)
                if on_event is not None:
                    on_event(event)
    except httpx.TransportError as exc:
        raise _calls.transport_error(exc, config) from exc
    return _outcome(last)


def _outcome(last: BuildEvent | None) -> BuildEvent:
    """The stream's result (see :func:`keep`): its ``done`` event, or its error raised."""
    if last is None or last.kind not in ("done", "error"):
        raise errors.EmberboxError("the server ended the build's stream without a result")
    if last.kind == "error":
        raise calls.failure(last)
    return last


def keep(result: BuildEvent | None, event: BuildEvent) -> BuildEvent:
    """What decides a stream's outcome so far: the first ``error``, else the newest
    ``done``, else the newest event."""
    if result is not None and result.kind == "error":
        return result
    if result is not None and result.kind == "done" and event.kind != "error":
        return result
    return event


def _send_once(call: Call, url: str | None, api_key: str | None) -> httpx.Response:
    config = ClientConfig.resolve(url, api_key)
    with httpx.Client(**config.client_options()) as client:
        try:
            return client.request(**call.request_options())
        except httpx.TransportError as exc:
            raise _calls.transport_error(exc, config) from exc
