"""emberbox: run untrusted code in microVMs on your own Linux host."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emberbox._version import __version__

if TYPE_CHECKING:
    from emberbox.sdk import run_code


def __getattr__(name: str) -> Any:
    # emberbox.run_code is the SDK's; imported on first use so that `import emberbox`
    # (the server, the CLI) does not load the HTTP client.
    if name == "run_code":
        from emberbox.sdk import run_code

        return run_code
    raise AttributeError(f"module 'emberbox' has no attribute {name!r}")


__all__ = ["__version__", "run_code"]
