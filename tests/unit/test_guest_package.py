"""The guest agent is a package of its own: stdlib-only imports, relative among its
modules, no fallback imports, every module installed by the image, every Op dispatched."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from emberbox.guest import agent, common
from emberbox.guest.protocol import Op
from emberbox.images import initramfs
from emberbox.images.build import AGENT_INSTALL_DIR, GUEST_PACKAGE, agent_files
from emberbox.images.rootfs import guest_files

MODULES = sorted(GUEST_PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _depth(path: Path) -> int:
    """How many relative levels (dots) stay inside the package from this module."""
    return len(path.relative_to(GUEST_PACKAGE).parts)


def foreign_imports(tree: ast.Module, depth: int) -> list[str]:
    """What a module imports besides the standard library and its own package: absolute
    imports of non-stdlib names (``emberbox`` included) and relative ones reaching out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):
            names = [] if node.level <= depth else ["." * node.level + (node.module or "")]
        else:
            continue
        stdlib = sys.stdlib_module_names
        found += [n for n in names if n.startswith(".") or n.partition(".")[0] not in stdlib]
    return found


def fallback_imports(tree: ast.Module) -> list[int]:
    """Lines of imports inside a ``try`` (the old flat-install fallbacks)."""
    return [
        node.lineno
        for block in ast.walk(tree)
        if isinstance(block, ast.Try)
        for node in ast.walk(block)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]


def test_the_package_is_listed() -> None:
    """The package has its entry point and its modules (the checks below are not vacuous)."""
    names = {p.relative_to(GUEST_PACKAGE).as_posix() for p in MODULES}
    assert {"__init__.py", "__main__.py", "agent.py", "channel.py", "protocol.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_only_the_stdlib_and_itself(path: Path) -> None:
    """No guest module imports anything outside the standard library and its package,
    and none has a fallback import (the package runs under any name it is installed as)."""
    tree = _tree(path)
    assert foreign_imports(tree, _depth(path)) == []
    assert fallback_imports(tree) == []


def test_the_import_check_catches_foreign_imports() -> None:
    """The check flags third-party, absolute emberbox and escaping relative imports."""
    source = (
        "import os, json\nfrom collections import abc\nfrom . import protocol\n"
        "import yaml\nfrom emberbox.guest import protocol\nfrom .. import errors\n"
        "try:\n    import fcntl\nexcept ImportError:\n    pass\n"
    )
    tree = ast.parse(source)
    assert foreign_imports(tree, depth=1) == ["yaml", "emberbox.guest", ".."]
    assert fallback_imports(tree) == [8]


def test_the_image_installs_every_module_where_the_init_runs_it() -> None:
    """Every .py of the package (no hand-kept list) goes under AGENT_DIR/AGENT_PACKAGE,
    the directory and module name the initramfs starts with ``python3 -m``."""
    assert set(agent_files()) == {p.relative_to(GUEST_PACKAGE).as_posix() for p in MODULES}
    installed = {
        path for path in guest_files(agent_files(), AGENT_INSTALL_DIR) if path.endswith(".py")
    }
    prefix = f"{initramfs.AGENT_DIR}/{initramfs.AGENT_PACKAGE}/".lstrip("/")
    assert installed == {prefix + name for name in agent_files()}
    init = initramfs.render_init([])
    assert f"export PYTHONPATH={initramfs.AGENT_DIR}\n" in init
    assert f"-m {initramfs.AGENT_PACKAGE}\n" in init


def test_the_agent_dispatches_every_op() -> None:
    """The agent's table has a handler for each Op member, and only for those."""
    table = agent.Agent(None, 0.0)._ops
    assert set(table) == set(Op)
    assert all(isinstance(op, Op) for op in table)


@pytest.mark.parametrize("value", ["frobnicate", "EXEC", None, 5, ["exec"], {"op": "exec"}])
def test_anything_but_an_op_is_a_bad_request(value: object) -> None:
    """An op that is not an Op value (a wrong case, a non-string) is BadRequest."""
    with pytest.raises(common.BadRequest, match="unknown op"):
        agent.parse_op(value)


def test_op_values_parse_to_their_members() -> None:
    """Each Op's wire string parses back to that member."""
    assert [agent.parse_op(op.value) for op in Op] == list(Op)
