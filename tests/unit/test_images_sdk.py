"""The SDK's side of image builds: the context tar made on the client (``.dockerignore``
as Docker reads it, symlinks kept, the Dockerfile always sent), and a build's NDJSON
events turned into callbacks and a result or an ImageBuildError."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.models.images import BuildEvent
from emberbox.sdk import _image_calls as calls
from emberbox.sdk._images import _outcome, keep


def names(context: Path, dockerfile: str = "Dockerfile") -> tuple[list[str], str]:
    out = io.BytesIO()
    inside = calls.write_context(context, dockerfile, out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        return sorted(m.name for m in tar.getmembers()), inside


def make(root: Path, *files: str) -> None:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("a.log", "*.log", True),
        ("dir/a.log", "*.log", False),  # * does not cross /
        ("dir/a.log", "**/*.log", True),
        ("a.log", "**/*.log", True),
        ("node_modules/x/y.js", "node_modules", True),  # a directory takes its contents
        ("build/out", "/build", True),
        ("src/a.py", "src/?.py", True),
        ("src/ab.py", "src/?.py", False),
        ("x1", "x[0-9]", True),
        ("xa", "x[!0-9]", True),
    ],
)
def test_dockerignore_patterns(path: str, pattern: str, expected: bool) -> None:
    assert calls.ignored(path, calls.ignore_rules(pattern)) is expected


def test_exceptions_and_comments() -> None:
    rules = calls.ignore_rules("# comment\n*.md\n!README.md\n\n")
    assert calls.ignored("notes.md", rules)
    assert not calls.ignored("README.md", rules)


def test_context_tar_honours_dockerignore_and_keeps_the_dockerfile(tmp_path: Path) -> None:
    make(tmp_path, "Dockerfile", "app/main.py", "app/cache/x.pyc", "secret.env", "docs/a.md")
    (tmp_path / ".dockerignore").write_text("secret.env\napp/cache\n*.md\n**/*.md\nDockerfile\n")
    os.symlink("/etc/passwd", tmp_path / "link")
    found, inside = names(tmp_path)
    assert inside == "Dockerfile"
    assert found == [".dockerignore", "Dockerfile", "app", "app/main.py", "docs", "link"]
    out = io.BytesIO()
    calls.write_context(tmp_path, "Dockerfile", out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        link = tar.getmember("link")
        assert link.issym() and link.linkname == "/etc/passwd"  # kept, never followed
        assert tar.getmember("app/main.py").uid == 0


def test_a_dockerfile_outside_the_context_is_added(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    make(context, "a.txt")
    make(tmp_path, "other.Dockerfile")
    found, inside = names(context, str(tmp_path / "other.Dockerfile"))
    assert inside == calls.OUTSIDE_DOCKERFILE and found == [calls.OUTSIDE_DOCKERFILE, "a.txt"]
    with pytest.raises(errors.InvalidRequest):
        names(context, "missing.Dockerfile")
    with pytest.raises(errors.InvalidRequest):
        names(tmp_path / "nope")


def test_events_and_outcome() -> None:
    line = '{"kind":"step","step":2,"total":3,"instruction":"RUN x","state":"running","new":1}'
    assert calls.parse_event(line) == BuildEvent(
        "step", step=2, total=3, instruction="RUN x", state="running"
    )
    assert calls.parse_event("not json") is None and calls.parse_event("") is None
    assert _outcome(BuildEvent("done", image="x")).image == "x"
    failed = BuildEvent("error", step=2, exit_code=3, log="boom\n", message="RUN failed")
    with pytest.raises(errors.ImageBuildError) as caught:
        _outcome(failed)
    assert {k: caught.value.details[k] for k in ("step", "exit_code", "log")} == {
        "step": 2,
        "exit_code": 3,
        "log": "boom\n",
    }
    quota = BuildEvent("error", message="image quota", error="QuotaExceeded")
    with pytest.raises(errors.QuotaExceeded, match="image quota"):
        _outcome(quota)
    with pytest.raises(errors.EmberboxError, match="without a result"):
        _outcome(BuildEvent("log", log="x"))


def test_build_call_params() -> None:
    call = calls.build_call("app", "Dockerfile", b"", 0, {"V": "1"}, True)
    assert call.params == [
        ("name", "app"),
        ("dockerfile", "Dockerfile"),
        ("build_arg", "V=1"),
        ("no_cache", "true"),
    ]
    with pytest.raises(errors.InvalidRequest):
        calls.get_call("a/b")


def test_the_outcome_is_the_first_error_else_the_last_done() -> None:
    def outcome(*kinds: str) -> str | None:
        result = None
        for kind in kinds:
            result = keep(result, BuildEvent(kind))  # type: ignore[arg-type]
        return None if result is None else result.kind

    assert outcome("step", "done", "progress") == "done"
    assert outcome("step", "error", "done") == "error"
    assert outcome("step", "log") == "log"
