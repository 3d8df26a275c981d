"""emberbox: run untrusted code in microVMs on your own Linux host."""

from __future__ import annotations

__version__ = "0.1.0"
