"""A Dockerfile, read without a Docker engine: :func:`parse` (the text into instructions)
and :func:`plan` (instructions and build args into the steps a build runs). Pure.

Read as Docker reads it: parser directives at the top (``# escape=``` is honoured, others
ignored), comment lines (also inside continuations), line continuations, instructions
case-insensitive, shell and exec (JSON) forms, ``ARG`` before ``FROM``, ``ENV k=v`` and
the legacy ``ENV k v``, and ``$VAR`` / ``${VAR}`` / ``${VAR:-word}`` / ``${VAR:+word}``
expanded in the instructions Docker expands (not in ``RUN``/``CMD``/``ENTRYPOINT``,
where the shell does it).

Supported: ``FROM``, ``RUN``, ``COPY``/``ADD`` (local context files; ``--chown``,
``--chmod``), ``ENV``, ``ARG``, ``WORKDIR``, ``USER``, ``LABEL``; ``EXPOSE``, ``CMD``
and ``ENTRYPOINT`` are recorded as metadata. Anything else (multi-stage builds,
``--mount``, ``ADD <url>``, ``VOLUME``, ``HEALTHCHECK``…) is refused with its line.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from emberbox.errors import InvalidRequest

SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL")
METADATA = ("EXPOSE", "CMD", "ENTRYPOINT")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FLAG = re.compile(r"^--([a-z-]+)(?:=(.*))?$")
MAX_LINES = 10_000


class DockerfileError(InvalidRequest):
    """A Dockerfile emberbox cannot build; ``line`` is 1-based (0: the file as a whole)."""

    def __init__(self, line: int, message: str) -> None:
        text = f"Dockerfile line {line}: {message}" if line else f"Dockerfile: {message}"
        super().__init__(text, line=line)
        self.line = line


@dataclass(frozen=True)
class Instruction:
    """One instruction as written: ``keyword`` upper-cased, ``args`` after it (the
    continuations joined), ``line`` where it starts."""

    line: int
    keyword: str
    args: str

    @property
    def text(self) -> str:
        return f"{self.keyword} {self.args}".strip()


# -- the text into instructions --------------------------------------------------------------


def parse(text: str) -> list[Instruction]:
    """The instructions of ``text`` (DockerfileError for what is not one)."""
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise DockerfileError(0, f"more than {MAX_LINES} lines")
    escape, start = _directives(lines)
    found: list[Instruction] = []
    pending: list[str] = []
    first = 0
    for number, raw in enumerate(lines[start:], start=start + 1):
        stripped = raw.strip()
        if not pending and not stripped:
            continue
        if stripped.startswith("#"):
            continue  # a comment, even between continued lines
        if not pending:
            first = number
        if stripped.endswith(escape) and not stripped.endswith(escape * 2):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        found.append(_instruction(first, " ".join(p.strip() for p in pending if p.strip())))
        pending = []
    if pending:
        found.append(_instruction(first, " ".join(p.strip() for p in pending if p.strip())))
    return found


def _directives(lines: list[str]) -> tuple[str, int]:
    """The escape character and the index of the first line after the directives."""
    escape = "\\"
    for index, line in enumerate(lines):
        match = _DIRECTIVE.match(line.strip())
        if not match:
            return escape, index
        if match.group(1).lower() == "escape":
            if match.group(2) not in ("\\", "`"):
                raise DockerfileError(index + 1, f"escape must be \\ or `, not {match.group(2)!r}")
            escape = match.group(2)
    return escape, len(lines)


def _instruction(line: int, joined: str) -> Instruction:
    keyword, _, args = joined.partition(" ")
    return Instruction(line, keyword.upper(), args.strip())


# -- variables -------------------------------------------------------------------------------


def expand(word: str, variables: Mapping[str, str], line: int = 0) -> str:
    """``word`` with ``$VAR``, ``${VAR}``, ``${VAR:-x}``, ``${VAR:+x}`` replaced (``\\$``
    keeps a dollar); quotes are kept (see :func:`words`)."""
    out: list[str] = []
    i = 0
    while i < len(word):
        char = word[i]
        if char == "\\" and i + 1 < len(word) and word[i + 1] == "$":
            out.append("$")
            i += 2
        elif char == "$":
            value, i = _variable(word, i + 1, variables, line)
            out.append(value)
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _variable(word: str, i: int, variables: Mapping[str, str], line: int) -> tuple[str, int]:
    if i < len(word) and word[i] == "{":
        end = word.find("}", i)
        if end < 0:
            raise DockerfileError(line, f"missing }} in {word!r}")
        body = word[i + 1 : end]
        name, op, default = re.match(r"^([^:]*)(:[-+])?(.*)$", body).groups("")  # type: ignore[union-attr]
        if not _NAME.match(name) or (default and not op):
            raise DockerfileError(line, f"bad substitution ${{{body}}}")
        value = variables.get(name, "")
        if op == ":-":
            value = value or expand(default, variables, line)
        elif op == ":+":
            value = expand(default, variables, line) if value else ""
        return value, end + 1
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", word[i:])
    if not match:
        return "$", i
    return variables.get(match.group(0), ""), i + match.end()


def words(text: str, variables: Mapping[str, str] | None, line: int) -> list[str]:
    """``text`` split into words as Docker's word processor does: quotes group and are
    removed, a backslash escapes the next character, variables are expanded (outside
    single quotes) when ``variables`` is given."""
    found: list[str] = []
    current: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote == "'":
            if char == "'":
                quote = ""
            else:
                current.append(char)
            i += 1
            continue
        if char == "\\" and i + 1 < len(text) and (quote == "" or text[i + 1] in '"\\$'):
            current.append(text[i + 1])
            in_word = True
            i += 2
            continue
        if char == "$" and variables is not None:
            start = i
            _, i = _variable(text, i + 1, variables, line)
            current.append(expand(text[start:i], variables, line))
            in_word = True
            continue
        if quote == '"':
            if char == '"':
                quote = ""
            else:
                current.append(char)
        elif char in "'\"":
            quote, in_word = char, True
        elif char.isspace():
            if in_word:
                found.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
        i += 1
    if quote:
        raise DockerfileError(line, f"unterminated {quote} quote")
    if in_word:
        found.append("".join(current))
    return found


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


# -- the steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStep:
    line: int
    text: str
    command: tuple[str, ...] | str  # argv (exec form) or a /bin/sh -c line
    build_args: tuple[tuple[str, str], ...]  # ARGs in scope: in its environment and key

    def key(self) -> object:
        argv = self.command if isinstance(self.command, str) else list(self.command)
        return ["RUN", argv, [list(pair) for pair in self.build_args]]


@dataclass(frozen=True)
class CopyStep:
    line: int
    text: str
    sources: tuple[str, ...]  # context paths or patterns
    dest: str  # absolute; a trailing "/" means "into this directory"
    chown: str | None = None
    chmod: int | None = None

    def key(self) -> object:
        return ["COPY", list(self.sources), self.dest, self.chown, self.chmod]


@dataclass(frozen=True)
class ConfigStep:
    """A step that changes only the image's configuration (it is still in the key chain)."""

    line: int
    text: str
    keyword: str
    env: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    expose: tuple[str, ...] = ()
    arg: tuple[str, str | None] | None = None

    def key(self) -> object:
        values = [self.env, self.labels, self.workdir, self.user, self.cmd, self.entrypoint]
        return [self.keyword, repr(values), list(self.expose), self.arg]


Step = RunStep | CopyStep | ConfigStep


@dataclass(frozen=True)
class BuildPlan:
    base: str  # the FROM image, args expanded
    steps: tuple[Step, ...]
    unused_args: tuple[str, ...] = field(default=())  # build args no ARG declared


def plan(
    text: str,
    build_args: Mapping[str, str] | None = None,
    *,
    base_env: Mapping[str, str] | None = None,
    base_workdir: str = "",
) -> BuildPlan:
    """The steps of ``text`` with ``build_args`` applied; DockerfileError for anything
    unsupported (with the line and the instruction named).

    ``base_env`` and ``base_workdir`` are the FROM image's own (known once the first
    plan named it): ``ENV PATH=/opt/bin:$PATH`` expands the base's PATH, as in Docker.
    """
    planner = _Planner(dict(build_args or {}), dict(base_env or {}), base_workdir or "/")
    return planner.run(parse(text))


class _Planner:
    def __init__(self, build_args: dict[str, str], env: dict[str, str], workdir: str) -> None:
        self.given = build_args
        self.args: dict[str, str] = {}  # declared ARGs with a value, in scope
        self.env: dict[str, str] = env  # the base image's, then each ENV's
        self.workdir = workdir
        self.base: str | None = None
        self.steps: list[Step] = []
        self.used: set[str] = set()

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}  # ENV wins over ARG, as in Docker

    def run(self, instructions: list[Instruction]) -> BuildPlan:
        global_args: dict[str, str] = {}
        for ins in instructions:
            if ins.keyword not in SUPPORTED + METADATA:
                raise DockerfileError(ins.line, f"{ins.keyword} is not supported by emberbox")
            if self.base is None:
                if ins.keyword == "ARG":
                    name, value = self._arg(ins)
                    if value is not None:
                        global_args[name] = value
                    continue
                if ins.keyword != "FROM":
                    raise DockerfileError(ins.line, f"{ins.keyword} before FROM")
                self.base = self._from(ins, global_args)
                continue
            self._handlers()[ins.keyword](ins)
        if self.base is None:
            raise DockerfileError(0, "no FROM instruction")
        unused = tuple(sorted(set(self.given) - self.used))
        return BuildPlan(self.base, tuple(self.steps), unused)

    def _handlers(self) -> dict[str, Callable[[Instruction], None]]:
        return {
            "FROM": self._from_again,
            "RUN": self._run,
            "COPY": self._copy,
            "ADD": self._copy,
            "ENV": self._env,
            "ARG": self._arg_step,
            "WORKDIR": self._workdir,
            "USER": self._user,
            "LABEL": self._label,
            "EXPOSE": self._expose,
            "CMD": self._cmd,
            "ENTRYPOINT": self._entrypoint,
        }

    def _flags(self, ins: Instruction, allowed: tuple[str, ...]) -> tuple[dict[str, str], str]:
        flags: dict[str, str] = {}
        rest = ins.args
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            rest = rest.lstrip()
            match = _FLAG.match(token)
            if not match or match.group(1) not in allowed:
                raise DockerfileError(
                    ins.line, f"{ins.keyword} {token.split('=')[0]} is not supported"
                )
            flags[match.group(1)] = match.group(2) or ""
        return flags, rest

    def _arg(self, ins: Instruction) -> tuple[str, str | None]:
        parts = words(ins.args, None, ins.line)
        if len(parts) != 1:
            raise DockerfileError(ins.line, "ARG takes one NAME[=default]")
        name, eq, default = parts[0].partition("=")
        if not _NAME.match(name):
            raise DockerfileError(ins.line, f"bad ARG name {name!r}")
        self.used.add(name)
        if name in self.given:
            return name, self.given[name]
        return name, expand(default, self.variables(), ins.line) if eq else None

    def _from(self, ins: Instruction, global_args: dict[str, str]) -> str:
        self._flags(ins, ())
        parts = words(ins.args, global_args, ins.line)
        if len(parts) == 3 and parts[1].lower() == "as":
            parts = parts[:1]
        if len(parts) != 1 or not parts[0]:
            raise DockerfileError(ins.line, "FROM takes one image (FROM image [AS name])")
        return parts[0]

    def _run(self, ins: Instruction) -> None:
        self._flags(ins, ())
        argv = exec_form(ins.args)
        if argv is not None and not argv:
            raise DockerfileError(ins.line, "RUN [] has no command")
        if not ins.args:
            raise DockerfileError(ins.line, "RUN needs a command")
        command: tuple[str, ...] | str = tuple(argv) if argv is not None else ins.args
        args = tuple(sorted((k, v) for k, v in self.args.items() if k not in self.env))
        self.steps.append(RunStep(ins.line, ins.text, command, args))

    def _copy(self, ins: Instruction) -> None:
        flags, rest = self._flags(ins, ("chown", "chmod"))
        argv = exec_form(rest)
        variables = self.variables()
        if argv is not None:
            parts = [expand(a, variables, ins.line) for a in argv]
        else:
            parts = words(rest, variables, ins.line)
        if len(parts) < 2:
            raise DockerfileError(ins.line, f"{ins.keyword} needs a source and a destination")
        *sources, dest = parts
        for source in sources:
            if re.match(r"^[a-z][a-z0-9+.-]*://", source, re.IGNORECASE):
                raise DockerfileError(
                    ins.line, f"{ins.keyword} of a URL ({source}) is not supported"
                )
        several = len(sources) > 1 or any(any(c in s for c in "*?[") for s in sources)
        if several and not dest.endswith("/"):
            message = f"{ins.keyword} with several sources needs a destination ending in /"
            raise DockerfileError(ins.line, message)
        resolved = posixpath.normpath(posixpath.join(self.workdir, dest))
        if dest.endswith("/") or dest in (".", "./"):
            resolved = resolved.rstrip("/") + "/"
        chown = expand(flags["chown"], variables, ins.line) if "chown" in flags else None
        chmod = _mode(flags["chmod"], ins.line) if "chmod" in flags else None
        step = CopyStep(ins.line, ins.text, tuple(sources), resolved, chown or None, chmod)
        self.steps.append(step)

    def _env(self, ins: Instruction) -> None:
        pairs = self._pairs(ins, legacy=True)
        self.env.update(pairs)
        self.steps.append(ConfigStep(ins.line, ins.text, "ENV", env=tuple(pairs)))

    def _label(self, ins: Instruction) -> None:
        pairs = self._pairs(ins, legacy=False)
        self.steps.append(ConfigStep(ins.line, ins.text, "LABEL", labels=tuple(pairs)))

    def _pairs(self, ins: Instruction, *, legacy: bool) -> list[tuple[str, str]]:
        if not ins.args:
            raise DockerfileError(ins.line, f"{ins.keyword} needs KEY=VALUE")
        first = words(ins.args, None, ins.line)[0]
        variables = self.variables()
        if legacy and "=" not in first:  # ENV key value with spaces
            name, _, value = ins.args.partition(" ")
            value = " ".join(words(value.strip(), variables, ins.line))
            pairs = [(name, value)]
        else:
            pairs = []
            for word in words(ins.args, variables, ins.line):
                name, eq, value = word.partition("=")
                if not eq:
                    raise DockerfileError(ins.line, f"{ins.keyword} {word!r} is not KEY=VALUE")
                pairs.append((name, value))
        for name, _ in pairs:
            if legacy and not _NAME.match(name):
                raise DockerfileError(ins.line, f"bad {ins.keyword} name {name!r}")
        return pairs

    def _arg_step(self, ins: Instruction) -> None:
        name, value = self._arg(ins)
        if value is not None:
            self.args[name] = value
        self.steps.append(ConfigStep(ins.line, ins.text, "ARG", arg=(name, value)))

    def _workdir(self, ins: Instruction) -> None:
        parts = words(ins.args, self.variables(), ins.line)
        if len(parts) != 1:
            raise DockerfileError(ins.line, "WORKDIR takes one path")
        self.workdir = posixpath.normpath(posixpath.join(self.workdir, parts[0]))
        self.steps.append(ConfigStep(ins.line, ins.text, "WORKDIR", workdir=self.workdir))

    def _user(self, ins: Instruction) -> None:
        parts = words(ins.args, self.variables(), ins.line)
        if len(parts) != 1 or not re.match(
            r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*(:[A-Za-z0-9_.-]+)?$", parts[0]
        ):
            raise DockerfileError(ins.line, "USER takes one user[:group]")
        self.steps.append(ConfigStep(ins.line, ins.text, "USER", user=parts[0]))

    def _expose(self, ins: Instruction) -> None:
        ports = tuple(words(ins.args, self.variables(), ins.line))
        self.steps.append(ConfigStep(ins.line, ins.text, "EXPOSE", expose=ports))

    def _cmd(self, ins: Instruction) -> None:
        argv = exec_form(ins.args)
        command = tuple(argv) if argv is not None else ("/bin/sh", "-c", ins.args)
        self.steps.append(ConfigStep(ins.line, ins.text, "CMD", cmd=command))

    def _entrypoint(self, ins: Instruction) -> None:
        argv = exec_form(ins.args)
        command = tuple(argv) if argv is not None else ("/bin/sh", "-c", ins.args)
        self.steps.append(ConfigStep(ins.line, ins.text, "ENTRYPOINT", entrypoint=command))

    def _from_again(self, ins: Instruction) -> None:
        raise DockerfileError(ins.line, "multi-stage builds (a second FROM) are not supported")


def _mode(text: str, line: int) -> int:
    if not re.match(r"^[0-7]{3,4}$", text):
        raise DockerfileError(line, f"--chmod={text} is not an octal mode")
    return int(text, 8)
