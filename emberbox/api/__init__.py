"""The HTTP API: a thin FastAPI layer over :mod:`emberbox.service`."""

from __future__ import annotations

from emberbox.api.app import create_app

__all__ = ["create_app"]
