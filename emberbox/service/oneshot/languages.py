"""The languages of one-shot runs: how each is compiled and run in ``WORK_DIR``, and how
its version is found out in the run image (``GET /v1/languages``)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from emberbox import errors

_VERSION = re.compile(r"\d+(?:\.\d+)+")


@dataclass(frozen=True)
class Language:
    """How one language is compiled and run, inside ``WORK_DIR``."""

    name: str
    version_cmd: tuple[str, ...]
    source_file: str
    compile_argv: tuple[str, ...] | None
    run_argv: tuple[str, ...]
    # The guest's warm runtime that can run it (docs/oneshot.md, "Warm runtimes"), if any.
    warm_runtime: str | None = None

    @property
    def compiled(self) -> bool:
        return self.compile_argv is not None


LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language(
            "python3",
            ("python3", "--version"),
            "main.py",
            None,
            ("python3", "main.py"),
            warm_runtime="python3",
        ),
        Language("bash", ("bash", "--version"), "main.sh", None, ("bash", "main.sh")),
        Language("node", ("node", "--version"), "main.js", None, ("node", "main.js")),
        Language(
            "c",
            ("gcc", "--version"),
            "main.c",
            ("gcc", "-O2", "-std=gnu17", "-o", "main", "main.c", "-lm"),
            ("./main",),
        ),
        Language(
            "c++",
            ("g++", "--version"),
            "main.cpp",
            ("g++", "-O2", "-std=gnu++17", "-o", "main", "main.cpp"),
            ("./main",),
        ),
    )
}


def find_language(name: str) -> Language:
    """The language called ``name``; InvalidRequest listing the languages otherwise."""
    language = LANGUAGES.get(name)
    if language is None:
        raise errors.InvalidRequest(
            f"unknown language {name!r}; languages: {', '.join(LANGUAGES)}", field="language"
        )
    return language


def versions_command() -> str:
    """One shell line printing ``name=<first line of its version command>`` per language."""
    return "; ".join(
        f'echo {shlex.quote(lang.name)}="$({shlex.join(lang.version_cmd)} 2>&1 | head -n 1)"'
        for lang in LANGUAGES.values()
    )


def parse_versions(output: str) -> dict[str, str | None]:
    """``{language: "3.11.2"}`` from :func:`versions_command`'s output (None: not found)."""
    found: dict[str, str | None] = dict.fromkeys(LANGUAGES)
    for line in output.splitlines():
        name, _, text = line.partition("=")
        match = _VERSION.search(text)
        if name in found and match:
            found[name] = match.group(0)
    return found
