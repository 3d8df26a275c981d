"""emberbox: run untrusted code in microVMs on your own Linux host."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emberbox._version import __version__

if TYPE_CHECKING:
    from emberbox.sdk import AsyncSandbox, Sandbox, run_code

_FROM_SDK = ("AsyncSandbox", "Sandbox", "run_code")


def __getattr__(name: str) -> Any:
    # The SDK's names, imported on first use so that `import emberbox` (the server, the
    # CLI) does not load the HTTP client.
    if name in _FROM_SDK:
        from emberbox import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'emberbox' has no attribute {name!r}")


__all__ = ["AsyncSandbox", "Sandbox", "__version__", "run_code"]
