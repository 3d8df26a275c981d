"""The layer cache of Dockerfile builds: step keys, entries on disk, per-key locks.

A step's key is ``sha256(parent key, the step as resolved (with the build args in its
scope), and for COPY the content hash of what it copies)``; the chain starts at the base
image's content hash and the builder disk size. Only steps that change the disk (RUN,
COPY, ADD) have an entry::

    <cache>/build/layers/<key>/rootfs.ext4     the disk after the step (sparse raw ext4)
    <cache>/build/layers/<key>/meta.json       step text, parent, size
    <cache>/build/bases/<hash>-<MiB>/rootfs.ext4   a base image grown to the builder disk
    <cache>/build/work/<build id>/                 one build's scratch (removed after it)

An entry is written under a temporary name and renamed into place, so a reader sees a
whole entry or none; the first writer wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

from emberbox.config import Settings
from emberbox.service.images.layers import LAYER_FILE

META_FILE = "meta.json"


def step_key(parent: str, step: object, content: str | None = None) -> str:
    body = json.dumps([parent, step, content], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


class LayerCache:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.build_cache_dir

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def bases(self) -> Path:
        return self.root / "bases"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def layer(self, key: str) -> Path | None:
        """The disk of step ``key``, if it is cached (marked used now, for :meth:`prune`)."""
        disk = self.layers / key / LAYER_FILE
        meta = self.layers / key / META_FILE
        if not (meta.is_file() and disk.is_file()):
            return None
        with contextlib.suppress(OSError):
            os.utime(meta)
        return disk

    def prune(self, max_bytes: int, keep: Collection[str] = ()) -> list[str]:
        """Remove the least recently used entries (not those in ``keep``) until the
        layers take at most ``max_bytes`` on disk; the keys removed. Registered images
        hold their own link to their rootfs, so an image never loses its disk."""
        if not self.layers.is_dir():
            return []
        entries = []
        for entry in self.layers.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                used = (entry / META_FILE).stat().st_mtime
                size = sum(p.stat().st_blocks * 512 for p in entry.iterdir())
            except OSError:
                continue
            entries.append((used, entry.name, size))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, key, size in sorted(entries):
            if total <= max_bytes:
                break
            if key in keep:
                continue
            shutil.rmtree(self.layers / key, ignore_errors=True)
            total -= size
            removed.append(key)
        return removed

    def publish(self, key: str, disk: Path, meta: dict[str, Any]) -> Path:
        """Move ``disk`` into the entry of ``key`` (kept if another build wrote it first)."""
        self.layers.mkdir(parents=True, exist_ok=True)
        staging = self.layers / f".{key}.{os.getpid()}.{id(disk)}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            os.replace(disk, staging / LAYER_FILE)
            (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.rename(staging, self.layers / key)
            except OSError:
                if self.layer(key) is None:
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        found = self.layer(key)
        assert found is not None
        return found

    def meta(self, key: str) -> dict[str, Any]:
        try:
            raw = json.loads((self.layers / key / META_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}


class KeyLocks:
    """One asyncio lock per key, dropped when no one holds or waits for it: builds of
    the same Dockerfile (the same final key) run one after the other, so the second
    finds everything cached."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
