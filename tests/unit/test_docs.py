"""The operator's documentation keeps up with the code."""

from __future__ import annotations

from pathlib import Path

from emberbox.config import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _env_name(name: str) -> str:
    alias = Settings.model_fields[name].alias
    return alias or f"EMBERBOX_{name.upper()}"


def test_every_setting_is_documented() -> None:
    """docs/configuration.md names every Settings field's environment variable."""
    text = (DOCS / "configuration.md").read_text()
    missing = [_env_name(name) for name in Settings.model_fields if _env_name(name) not in text]
    assert missing == []


def test_security_doc_links_exist() -> None:
    """docs/security.md only links to documents that exist."""
    text = (DOCS / "security.md").read_text()
    for name in ("configuration.md", "networking.md", "tenancy.md"):
        assert f"({name})" in text
        assert (DOCS / name).is_file()
