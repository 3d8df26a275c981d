"""``sb.ports``: servers inside a sandbox, reached through the emberbox server.

An HTTP (or WebSocket) server listening on ``port`` in the guest answers at
``{server}/v1/sandboxes/{id}/ports/{port}/`` with the same API key as every call; the
guest needs no network. :meth:`Ports.publish` gives the port a public URL that needs no
key (an unguessable token) until :meth:`Ports.unpublish`. See docs/ports.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from emberbox.models import PortPublic
from emberbox.sdk import _calls
from emberbox.sdk._calls import Call, ClientConfig

if TYPE_CHECKING:
    from emberbox.sdk._async import AsyncSandbox
    from emberbox.sdk._sync import Sandbox


class PortInfo(PortPublic):
    """A port of the sandbox: ``public``, and its public ``url`` (absolute) when it is."""


def port_url(config: ClientConfig, sandbox_id: str, port: int, path: str = "/") -> str:
    """``{server}/v1/sandboxes/{id}/ports/{port}/{path}``."""
    return f"{config.url}/v1/sandboxes/{sandbox_id}/ports/{port}/{path.lstrip('/')}"


def host_of(config: ClientConfig, sandbox_id: str, port: int) -> str:
    """The port's address without the scheme (E2B's ``get_host``): ``HOST[:PORT]/PATH``."""
    parts = urlsplit(port_url(config, sandbox_id, port, ""))
    return f"{parts.netloc}{parts.path.rstrip('/')}"


def tcp_url(config: ClientConfig, sandbox_id: str, port: int) -> str:
    """The WebSocket that carries raw TCP to the guest's ``port`` (``port-forward``)."""
    scheme, rest = config.url.split("://", 1)
    ws = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{ws}://{rest}/v1/sandboxes/{sandbox_id}/tcp/{port}"


def auth_headers(config: ClientConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def update_call(sandbox_id: str, port: int, public: bool) -> Call:
    return Call("POST", f"/v1/sandboxes/{sandbox_id}/ports/{port}", json={"public": public})


def absolute(config: ClientConfig, info: PortPublic) -> PortInfo:
    url = f"{config.url}{info.url}" if info.url else None
    return PortInfo(**{**info.model_dump(), "url": url})


class Ports:
    """``sandbox.ports``: URLs of servers in the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def url(self, port: int, path: str = "/") -> str:
        """The URL of ``path`` on the guest's ``port`` (send the API key with it).

        >>> httpx.get(sb.ports.url(8000), headers={"Authorization": f"Bearer {key}"})
        """
        return port_url(self._sandbox._config, self._sandbox.id, port, path)

    def publish(self, port: int) -> PortInfo:
        """Give ``port`` a public URL (no key needed) until :meth:`unpublish`.

        >>> print(sb.ports.publish(8000).url)  # open it in a browser
        """
        call = update_call(self._sandbox.id, port, True)
        info = _calls.parse(PortPublic, self._sandbox._request(call))
        return absolute(self._sandbox._config, info)

    def unpublish(self, port: int) -> None:
        """Revoke the port's public URL (it answers 404 from now on)."""
        _calls.parse(PortPublic, self._sandbox._request(update_call(self._sandbox.id, port, False)))


class AsyncPorts:
    """``sandbox.ports`` of the async client."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def url(self, port: int, path: str = "/") -> str:
        """The URL of ``path`` on the guest's ``port`` (send the API key with it)."""
        return port_url(self._sandbox._config, self._sandbox.id, port, path)

    async def publish(self, port: int) -> PortInfo:
        """Give ``port`` a public URL (no key needed) until :meth:`unpublish`."""
        call = update_call(self._sandbox.id, port, True)
        info = _calls.parse(PortPublic, await self._sandbox._request(call))
        return absolute(self._sandbox._config, info)

    async def unpublish(self, port: int) -> None:
        """Revoke the port's public URL (it answers 404 from now on)."""
        call = update_call(self._sandbox.id, port, False)
        _calls.parse(PortPublic, await self._sandbox._request(call))
