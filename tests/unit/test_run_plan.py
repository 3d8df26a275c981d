"""One-shot runs, the parts that need neither settings nor a VM: the language table, file
names and packing, classification and version parsing."""

from __future__ import annotations

import io
import signal
import tarfile
from pathlib import Path
from typing import Any

import pytest

from emberbox import errors
from emberbox.images.build import RECIPES
from emberbox.images.rootfs import RootfsRecipe, mmdebstrap_argv
from emberbox.service.oneshot import runner as run
from emberbox.service.oneshot.runner import LANGUAGES, RunStatus
from tests.support.fakes_run import exec_result

# --- the language table ------------------------------------------------------------------


def test_the_languages_the_issue_asks_for() -> None:
    """python3, bash, node, c and c++ are offered, each with a version command."""
    assert set(LANGUAGES) >= {"python3", "bash", "node", "c", "c++"}
    for name, lang in LANGUAGES.items():
        assert lang.name == name
        assert lang.version_cmd and lang.run_argv
        assert "/" not in lang.source_file


def test_compiled_languages_build_main_from_their_source() -> None:
    """A compiled language's compiler reads its source file and writes ./main, which runs."""
    for lang in LANGUAGES.values():
        if lang.compile_argv is None:
            assert lang.source_file in lang.run_argv
            continue
        assert lang.compiled
        assert lang.source_file in lang.compile_argv
        assert lang.compile_argv[lang.compile_argv.index("-o") + 1] == "main"
        assert lang.run_argv == ("./main",)


def test_unknown_language_lists_the_languages() -> None:
    """An unknown language is InvalidRequest naming every language."""
    with pytest.raises(errors.InvalidRequest) as caught:
        run.find_language("cobol")
    assert "cobol" in caught.value.message
    for name in LANGUAGES:
        assert name in caught.value.message


def test_the_polyglot_recipe_adds_the_toolchains_to_the_default() -> None:
    """polyglot = the default's packages + node, gcc, g++ and libc headers, still minbase
    without Recommends; the default recipe (and so its image hash) is unchanged."""
    default, polyglot = RECIPES["default"].rootfs, RECIPES["polyglot"].rootfs
    assert default == RootfsRecipe()
    assert polyglot.packages == (*default.packages, "nodejs", "gcc", "g++", "libc6-dev")
    assert polyglot.variant == "minbase"
    assert polyglot.key() != default.key()
    argv = mmdebstrap_argv(polyglot, Path("/tmp/x.tar"))
    assert "--variant=minbase" in argv
    assert not any("Recommends" in arg for arg in argv)


# --- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["util.h", "lib/util.py", "a_b-c+d.txt", "_x", "x" * 255])
def test_good_file_names(name: str) -> None:
    """Relative paths of plain components are accepted."""
    run.check_file_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/", ".", ".hidden", "-rf", "a b", "x" * 256],
)
def test_bad_file_names(name: str) -> None:
    """Absolute paths, dot components, empty parts, odd characters and long names are refused."""
    with pytest.raises(errors.InvalidRequest):
        run.check_file_name(name)


def test_program_files_add_the_source_under_its_name() -> None:
    """The source is written as the language's file, next to the extra files."""
    files = run.program_files(LANGUAGES["c"], "int main;", [("lib/u.h", "#define U 1")])
    assert files == {"main.c": b"int main;", "lib/u.h": b"#define U 1"}


@pytest.mark.parametrize(
    ("language", "files"),
    [
        ("c", [("main.c", "x")]),  # the source's own name
        ("c", [("main", "x")]),  # the compiler's output
        ("python3", [("a", "1"), ("a", "2")]),  # twice
        ("python3", [("a", "1"), ("a/b", "2")]),  # a file and a directory
        ("python3", [(f"f{i}", "") for i in range(run.MAX_FILES + 1)]),
    ],
)
def test_program_files_refuse_clashes(language: str, files: list[tuple[str, str]]) -> None:
    """Names that clash with the program or each other are a 400, before any sandbox."""
    with pytest.raises(errors.InvalidRequest):
        run.program_files(LANGUAGES[language], "", files)


def test_a_python_program_may_ship_a_file_called_main() -> None:
    """Only compiled languages reserve `main`."""
    assert "main" in run.program_files(LANGUAGES["python3"], "", [("main", "data")])


def test_pack_files_is_a_tar_under_run() -> None:
    """The tar holds run/, its subdirectories and the files, with their bytes."""
    packed = run.pack_files({"main.py": b"print(1)", "lib/deep/u.py": b"X = 1"})
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {
            "run",
            "run/lib",
            "run/lib/deep",
            "run/main.py",
            "run/lib/deep/u.py",
        }
        assert members["run/lib"].isdir()
        assert members["run/lib"].mode == 0o777  # the program runs as nobody
        assert members["run/main.py"].mode == 0o666
        assert members["run/main.py"].mtime > 0
        extracted = tar.extractfile("run/lib/deep/u.py")
        assert extracted is not None
        assert extracted.read() == b"X = 1"


# --- classification ----------------------------------------------------------------------

CAP_KIB = 64 * 1024
KILL = signal.SIGKILL


@pytest.mark.parametrize(
    ("fields", "over", "status"),
    [
        ({}, False, RunStatus.OK),
        ({"exit_code": 3}, False, RunStatus.RUNTIME_ERROR),
        ({"exit_code": 139, "signal": 11}, False, RunStatus.RUNTIME_ERROR),
        ({"timed_out": True, "exit_code": 137, "signal": KILL}, False, RunStatus.TIMEOUT),
        ({"memory_limited": True, "exit_code": 137, "signal": KILL}, False, RunStatus.MEMORY_LIMIT),
        ({"memory_limited": True, "timed_out": True}, False, RunStatus.MEMORY_LIMIT),
        ({"output_truncated": True}, False, RunStatus.OUTPUT_LIMIT),
        ({}, True, RunStatus.OUTPUT_LIMIT),
        ({"timed_out": True}, True, RunStatus.OUTPUT_LIMIT),
        ({"exit_code": 3}, True, RunStatus.OUTPUT_LIMIT),
        # The fallback: killed near the limit, without cgroup events.
        ({"signal": KILL, "exit_code": 137, "peak_memory_kib": CAP_KIB}, False, "memory_limit"),
        ({"signal": KILL, "exit_code": 137, "peak_memory_kib": 100}, False, "runtime_error"),
        ({"signal": KILL, "exit_code": 137}, False, RunStatus.RUNTIME_ERROR),
        (
            {"signal": KILL, "timed_out": True, "peak_memory_kib": CAP_KIB},
            False,
            RunStatus.TIMEOUT,
        ),
    ],
)
def test_classify(fields: dict[str, Any], over: bool, status: str) -> None:
    """memory_limit, output_limit, timeout, runtime_error, ok: the first that matches."""
    assert run.classify(exec_result(**fields), CAP_KIB, over) == status


def test_clip() -> None:
    """clip keeps at most cap bytes and says whether it dropped any."""
    assert run.clip(b"abc", 3) == (b"abc", False)
    assert run.clip(b"abcd", 3) == (b"abc", True)


# --- versions ----------------------------------------------------------------------------


def test_versions_command_asks_every_language() -> None:
    """One shell line with each language's version command."""
    line = run.versions_command()
    for lang in LANGUAGES.values():
        assert f"{lang.name}=" in line
        assert " ".join(lang.version_cmd) in line


def test_parse_versions() -> None:
    """The first dotted number of each language's first line; None when there is none."""
    output = (
        "python3=Python 3.11.2\n"
        "bash=GNU bash, version 5.2.15(1)-release (x86_64-pc-linux-gnu)\n"
        "node=v18.20.4\n"
        "c=gcc (Debian 12.2.0-14+deb12u1) 12.2.0\n"
        "c++=sh: 1: g++: not found\n"
        "stray line\n"
    )
    assert run.parse_versions(output) == {
        "python3": "3.11.2",
        "bash": "5.2.15",
        "node": "18.20.4",
        "c": "12.2.0",
        "c++": None,
    }
