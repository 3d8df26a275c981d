"""The build context tar: safe reading, caps, .dockerignore, COPY selection, the content
hash of a COPY and the tar it sends to the builder."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.images.context import (
    BuildContext,
    ContextError,
    IgnoreRules,
    Limits,
    clean_name,
)

Member = bytes | tuple[str, str] | None  # file, ("sym"|"hard", target), None: directory


def make_tar(path: Path, members: dict[str, Member], mode: int = 0o644) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            info.mode = mode
            if value is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(value, tuple):
                info.type = tarfile.SYMTYPE if value[0] == "sym" else tarfile.LNKTYPE
                info.linkname = value[1]
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return path


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[BuildContext]:
    tar = make_tar(
        tmp_path / "c.tar",
        {
            "./app.py": b"print(1)\n",
            "src": None,
            "src/a.txt": b"a\n",
            "src/sub/b.txt": b"b\n",
            "src/link": ("sym", "a.txt"),
            "src/hard": ("hard", "src/a.txt"),
            "docs/x.md": b"x\n",
            "secret.key": b"k\n",
            "build/out.o": b"o\n",
            "build/keep.txt": b"keep\n",
            ".dockerignore": b"# comment\n*.key\nbuild\n!build/keep.txt\n**/*.md\n",
        },
    )
    with BuildContext.open(tar) as context:
        yield context


def names(ctx: BuildContext, sources: list[str], dest: str) -> tuple[str, list[str]]:
    selection = ctx.select(sources, dest)
    return selection.directory, [name for name, _ in selection.members]


def test_members_are_indexed_by_clean_names(ctx: BuildContext) -> None:
    """./app.py is app.py."""
    assert "app.py" in ctx.members and "src/sub/b.txt" in ctx.members


@pytest.mark.parametrize("name", ["/etc/passwd", "a/../../x", "../x", "C:/x"])
def test_unsafe_names_are_refused(name: str) -> None:
    """Absolute names and .. never reach a COPY."""
    with pytest.raises(ContextError):
        clean_name(name)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"/abs": b"x"}, "absolute path"),
        ({"a/../../up": b"x"}, "goes up"),
        ({"l": ("sym", "/etc/shadow")}, "points outside"),
        ({"d/l": ("sym", "../../etc")}, "points outside"),
        ({"h": ("hard", "etc/passwd")}, "points outside"),
    ],
)
def test_unsafe_tars_are_refused(tmp_path: Path, members: dict[str, Member], message: str) -> None:
    """Absolute paths, .., and links that point out are ContextErrors (HTTP 400)."""
    with pytest.raises(ContextError, match=message):
        BuildContext.open(make_tar(tmp_path / "bad.tar", members))


def test_links_inside_the_context_are_fine(tmp_path: Path) -> None:
    """A relative symlink that stays inside, a hard link to an earlier member."""
    tar = make_tar(
        tmp_path / "ok.tar", {"d/f": b"x", "d/l": ("sym", "../d/f"), "h": ("hard", "d/f")}
    )
    with BuildContext.open(tar) as context:
        assert set(context.members) == {"d/f", "d/l", "h"}


def test_devices_are_refused(tmp_path: Path) -> None:
    """Only files, directories and links."""
    path = tmp_path / "dev.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    with pytest.raises(ContextError, match="not a file"):
        BuildContext.open(path)


def test_caps_on_entries_and_bytes(tmp_path: Path) -> None:
    """More entries or bytes than the limits: refused."""
    tar = make_tar(tmp_path / "big.tar", {"a": b"x" * 10, "b": b"y" * 10})
    with pytest.raises(ContextError, match="more than 1 entries"):
        BuildContext.open(tar, Limits(max_entries=1))
    with pytest.raises(ContextError, match="over 15 bytes"):
        BuildContext.open(tar, Limits(max_bytes=15))


def test_not_a_tar_is_refused(tmp_path: Path) -> None:
    """A clear error, not a traceback."""
    path = tmp_path / "x.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ContextError, match="not a readable tar"):
        BuildContext.open(path)


def test_empty_context() -> None:
    """No context: nothing to copy."""
    context = BuildContext.empty()
    with pytest.raises(ContextError, match="not in the build context"):
        context.select(["a"], "/x")


# -- .dockerignore ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "excluded"),
    [
        ("secret.key", True),
        ("build/out.o", True),
        ("build/keep.txt", False),
        ("docs/x.md", True),
        ("deep/er/y.md", True),
        ("app.py", False),
    ],
)
def test_ignore_rules(name: str, excluded: bool) -> None:
    """Docker's rules: globs, a directory excludes its contents, ! re-includes, **."""
    rules = IgnoreRules.parse("# comment\n*.key\nbuild\n!build/keep.txt\n**/*.md\n")
    assert rules.excludes(name) is excluded


def test_last_matching_rule_wins() -> None:
    """An exception then an exclusion again."""
    rules = IgnoreRules.parse("*.txt\n!a.txt\na.txt\n")
    assert rules.excludes("a.txt") and rules.excludes("b.txt")


def test_leading_slash_and_dot_slash_are_the_context_root() -> None:
    """/x and ./x both mean x; "." and "/" are ignored."""
    rules = IgnoreRules.parse("/x\n./y\n.\n/\n")
    assert rules.excludes("x") and rules.excludes("y") and not rules.excludes("z")


def test_question_mark_and_classes() -> None:
    """? is one character, [ab] a class, [!a] a negated class, never across /."""
    rules = IgnoreRules.parse("f?.txt\n[ab].c\n[!x].d\n")
    assert rules.excludes("f1.txt") and not rules.excludes("f12.txt")
    assert rules.excludes("a.c") and not rules.excludes("c.c")
    assert rules.excludes("y.d") and not rules.excludes("x.d")
    assert not rules.excludes("f/.txt")


# -- COPY selection -------------------------------------------------------------------------------


def test_a_file_into_a_directory(ctx: BuildContext) -> None:
    """dest/ : the file keeps its name."""
    assert names(ctx, ["app.py"], "/opt/") == ("/opt", ["app.py"])


def test_a_file_as_a_file(ctx: BuildContext) -> None:
    """dest without /: the file is renamed."""
    assert names(ctx, ["app.py"], "/usr/local/bin/app") == ("/usr/local/bin", ["app"])


def test_a_directory_copies_its_contents(ctx: BuildContext) -> None:
    """COPY src /dst: src's contents land in /dst, links included."""
    directory, found = names(ctx, ["src"], "/dst")
    assert directory == "/dst"
    assert found == ["a.txt", "hard", "link", "sub/b.txt"]


def test_the_whole_context_honours_dockerignore(ctx: BuildContext) -> None:
    """COPY . /app/ leaves the ignored files out."""
    _, found = names(ctx, ["."], "/app/")
    assert "secret.key" not in found and "build/out.o" not in found
    assert "docs/x.md" not in found
    assert "build/keep.txt" in found and "app.py" in found


def test_wildcards(ctx: BuildContext) -> None:
    """*.py matches at the top only; ignored files never match."""
    assert names(ctx, ["*.py"], "/a/") == ("/a", ["app.py"])
    with pytest.raises(ContextError, match="not in the build context"):
        ctx.select(["*.key"], "/a/")


@pytest.mark.parametrize("source", ["../outside", "src/../../x", "a/../../../etc/passwd"])
def test_sources_outside_the_context_are_refused(ctx: BuildContext, source: str) -> None:
    """COPY ../outside: refused, naming the source."""
    with pytest.raises(ContextError, match="outside the build context"):
        ctx.select([source], "/x")


def test_an_ignored_or_missing_source_is_refused(ctx: BuildContext) -> None:
    """Not in the context (or excluded): refused."""
    for source in ("secret.key", "nope.txt"):
        with pytest.raises(ContextError, match="not in the build context"):
            ctx.select([source], "/x")


# -- digest and the tar for the builder -----------------------------------------------------------


def test_digest_changes_with_content_name_and_mode(tmp_path: Path) -> None:
    """Same content, same hash; one byte, a name, or a mode changes it."""

    def digest(members: dict[str, Member], mode: int = 0o644, dest: str = "/d/") -> str:
        path = make_tar(tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar", members, mode)
        with BuildContext.open(path) as context:
            return context.digest(context.select(["."], dest))

    base = digest({"a": b"1", "b": b"2"})
    assert digest({"a": b"1", "b": b"2"}) == base
    assert digest({"a": b"1", "b": b"3"}) != base
    assert digest({"a": b"1", "c": b"2"}) != base
    assert digest({"a": b"1", "b": b"2"}, mode=0o755) != base
    assert digest({"a": b"1", "b": b"2"}, dest="/e/") != base


def test_copy_tar_renames_and_owns_by_root(ctx: BuildContext) -> None:
    """Names under the destination, owner root, links kept, --chmod applied."""
    out = io.BytesIO()
    count = ctx.copy_tar(ctx.select(["src"], "/dst"), out, chmod=0o600)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert count == len(members) == 4
        assert {m.uid for m in members.values()} == {0}
        assert members["a.txt"].mode == 0o600
        assert members["link"].issym() and members["link"].linkname == "a.txt"
        assert members["hard"].islnk() and members["hard"].linkname == "a.txt"
        handle = tar.extractfile(members["sub/b.txt"])
        assert handle is not None and handle.read() == b"b\n"


def test_a_hard_link_whose_target_is_not_copied_becomes_a_file(ctx: BuildContext) -> None:
    """COPY src/hard alone: its content, as a regular file."""
    out = io.BytesIO()
    ctx.copy_tar(ctx.select(["src/hard"], "/x/"), out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        (member,) = tar.getmembers()
        handle = tar.extractfile(member)
        assert member.isreg() and handle is not None and handle.read() == b"a\n"
