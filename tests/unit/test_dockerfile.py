"""The Dockerfile parser and planner: continuations, comments, directives, forms,
variables, every supported instruction, and refusals with their line."""

from __future__ import annotations

import pytest

from emberbox.errors import InvalidRequest
from emberbox.images.dockerfile import (
    ConfigStep,
    CopyStep,
    DockerfileError,
    RunStep,
    exec_form,
    expand,
    parse,
    plan,
    words,
)


def steps(text: str, **args: str) -> list[object]:
    return list(plan(text, args).steps)


# -- parse ------------------------------------------------------------------------------------


def test_continuations_join_lines_and_comments_inside_them_are_dropped() -> None:
    """A trailing backslash continues; a comment line inside a continuation vanishes."""
    found = parse("FROM default\nRUN apt-get update && \\\n  # why\n  apt-get install jq\n")
    assert [(i.line, i.keyword, i.args) for i in found] == [
        (1, "FROM", "default"),
        (2, "RUN", "apt-get update && apt-get install jq"),
    ]


def test_keywords_are_case_insensitive_and_blank_lines_ignored() -> None:
    """`run` is RUN; blank lines and comments produce nothing."""
    found = parse("\n# c\nfrom default\n\n  run   echo hi\n")
    assert [(i.line, i.keyword, i.args) for i in found] == [
        (3, "FROM", "default"),
        (5, "RUN", "echo hi"),
    ]


def test_parser_directives_are_skipped_and_escape_is_honoured() -> None:
    """`# escape=`` makes the backtick the continuation character."""
    found = parse("# syntax=docker/dockerfile:1\n# escape=`\nFROM default\nRUN echo a `\n  b\n")
    assert found[1].args == "echo a b"


def test_a_bad_escape_directive_is_refused() -> None:
    """Only \\ and ` can escape."""
    with pytest.raises(DockerfileError, match="line 1"):
        parse("# escape=x\nFROM default\n")


def test_a_continuation_at_the_end_of_the_file_still_ends_the_instruction() -> None:
    """The last line may end with a backslash."""
    assert parse("FROM default\nRUN echo \\\n")[1].args == "echo"


def test_too_many_lines_are_refused() -> None:
    """A cap on the file's size in lines."""
    with pytest.raises(DockerfileError):
        parse("\n" * 10_001)


# -- words and variables ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("$A", "1"),
        ("${A}x", "1x"),
        ("${MISSING:-dflt}", "dflt"),
        ("${A:-dflt}", "1"),
        ("${A:+set}", "set"),
        ("${MISSING:+set}", ""),
        ("\\$A", "$A"),
        ("$", "$"),
        ("a$MISSING-b", "a-b"),
    ],
)
def test_expand(word: str, expected: str) -> None:
    """Docker's variable forms."""
    assert expand(word, {"A": "1"}) == expected


def test_a_bad_substitution_is_refused() -> None:
    """${A?x} and an unclosed brace name the line."""
    with pytest.raises(DockerfileError, match="line 4"):
        expand("${A?x}", {}, 4)
    with pytest.raises(DockerfileError):
        expand("${A", {}, 1)


def test_words_group_quotes_and_expand_outside_single_quotes() -> None:
    """Double quotes expand, single quotes do not, backslash escapes."""
    assert words("a \"b $X\" 'c $X' d\\ e", {"X": "1"}, 1) == ["a", "b 1", "c $X", "d e"]


def test_an_unterminated_quote_is_refused() -> None:
    """With the line."""
    with pytest.raises(DockerfileError, match="line 7"):
        words('"open', {}, 7)


def test_exec_form_is_a_json_array_of_strings_only() -> None:
    """Anything else is the shell form."""
    assert exec_form('["a", "b"]') == ["a", "b"]
    assert exec_form("[not json") is None
    assert exec_form("[1, 2]") is None
    assert exec_form("echo") is None


# -- plan ---------------------------------------------------------------------------------------


def test_run_shell_and_exec_forms() -> None:
    """Shell form stays one string (the shell expands it); exec form is an argv."""
    found = steps('FROM default\nRUN echo $HOME\nRUN ["python3", "-c", "print(1)"]\n')
    assert found[0] == RunStep(2, "RUN echo $HOME", "echo $HOME", ())
    assert isinstance(found[1], RunStep) and found[1].command == ("python3", "-c", "print(1)")


def test_arg_before_from_expands_from_and_build_args_override() -> None:
    """ARG before FROM is for FROM only; --build-arg overrides the default."""
    assert plan("ARG BASE=default\nFROM $BASE\n").base == "default"
    assert plan("ARG BASE=default\nFROM ${BASE}\n", {"BASE": "polyglot"}).base == "polyglot"


def test_args_are_in_runs_environment_unless_env_shadows_them() -> None:
    """A RUN carries the ARGs in scope (its key changes with them)."""
    found = steps("FROM d\nARG V=1\nARG W=2\nENV W=3\nRUN echo\n", V="9")
    run = found[-1]
    assert isinstance(run, RunStep) and run.build_args == (("V", "9"),)
    other = steps("FROM d\nARG V=1\nARG W=2\nENV W=3\nRUN echo\n", V="8")[-1]
    assert isinstance(other, RunStep) and other.key() != run.key()


def test_unused_build_args_are_reported() -> None:
    """Docker warns about them; the plan lists them."""
    assert plan("FROM d\nARG A\n", {"A": "1", "B": "2"}).unused_args == ("B",)


def test_env_forms() -> None:
    """ENV k=v (several, quoted), legacy ENV k v w, and values expanded with the values
    from before the instruction (Docker's rule: ENV A=0, then ENV A=1 C=$A gives C=0)."""
    found = steps('FROM d\nENV A=0\nENV A=1 B="two words" C=$A\nENV D legacy $A words\n')
    assert isinstance(found[1], ConfigStep) and found[1].env == (
        ("A", "1"),
        ("B", "two words"),
        ("C", "0"),
    )
    assert isinstance(found[2], ConfigStep) and found[2].env == (("D", "legacy 1 words"),)


def test_env_needs_key_value() -> None:
    """ENV alone or ENV a=1 b is refused with the line."""
    with pytest.raises(DockerfileError, match="line 2"):
        steps("FROM d\nENV\n")
    with pytest.raises(DockerfileError, match="line 2"):
        steps("FROM d\nENV a=1 b\n")


def test_workdir_is_relative_to_the_previous_one_and_copy_dest_to_it() -> None:
    """WORKDIR /a then b is /a/b; COPY x ./ lands in it."""
    found = steps("FROM d\nWORKDIR /a\nWORKDIR b\nCOPY x ./\nCOPY y z\n")
    assert isinstance(found[1], ConfigStep) and found[1].workdir == "/a/b"
    assert isinstance(found[2], CopyStep) and found[2].dest == "/a/b/"
    assert isinstance(found[3], CopyStep) and found[3].dest == "/a/b/z"


def test_copy_flags_and_json_form() -> None:
    """--chown and --chmod; the JSON form; ADD is COPY of local files."""
    found = steps('FROM d\nCOPY --chown=user:user --chmod=640 a b /d/\nADD ["x y", "/e"]\n')
    assert found[0] == CopyStep(
        2, "COPY --chown=user:user --chmod=640 a b /d/", ("a", "b"), "/d/", "user:user", 0o640
    )
    assert isinstance(found[1], CopyStep) and found[1].sources == ("x y",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM d\nCOPY a b c\n", "ending in /"),
        ("FROM d\nCOPY *.txt /d\n", "ending in /"),
        ("FROM d\nCOPY a\n", "a source and a destination"),
        ("FROM d\nADD https://example.com/x /x\n", "URL"),
        ("FROM d\nCOPY --from=builder /a /b\n", "--from is not supported"),
        ("FROM d\nCOPY --chmod=9z a /b\n", "octal"),
        ("FROM d\nRUN --mount=type=cache,target=/x true\n", "--mount is not supported"),
    ],
)
def test_copy_and_run_refusals(text: str, message: str) -> None:
    """Each with its line."""
    with pytest.raises(DockerfileError, match="line 2") as caught:
        plan(text)
    assert message in caught.value.message


@pytest.mark.parametrize(
    "instruction", ["VOLUME /data", "HEALTHCHECK NONE", 'SHELL ["bash"]', "ONBUILD RUN x"]
)
def test_unsupported_instructions_are_refused_with_line_and_name(instruction: str) -> None:
    """The instruction named, the line given; an InvalidRequest (HTTP 400)."""
    with pytest.raises(InvalidRequest) as caught:
        plan(f"FROM d\nRUN true\n{instruction}\n")
    keyword = instruction.split()[0]
    assert caught.value.message == f"Dockerfile line 3: {keyword} is not supported by emberbox"
    assert caught.value.details == {"line": 3}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no FROM"),
        ("RUN true\n", "RUN before FROM"),
        ("FROM d\nFROM e\n", "multi-stage"),
        ("FROM a b\n", "one image"),
        ("FROM d\nRUN\n", "needs a command"),
        ("FROM d\nRUN []\n", "no command"),
        ("FROM d\nUSER a b\n", "USER"),
        ("FROM d\nWORKDIR a b\n", "WORKDIR"),
        ("FROM d\nARG 1x\n", "bad ARG"),
    ],
)
def test_structural_refusals(text: str, message: str) -> None:
    """What is not a buildable single-stage Dockerfile."""
    with pytest.raises(DockerfileError) as caught:
        plan(text)
    assert message in caught.value.message


def test_from_as_name_is_accepted() -> None:
    """A single stage may be named."""
    assert plan("FROM default AS base\nRUN true\n").base == "default"


def test_user_label_and_metadata() -> None:
    """USER and LABEL expand; EXPOSE/CMD/ENTRYPOINT are recorded."""
    found = steps(
        'FROM d\nENV U=app\nUSER $U:staff\nLABEL a=1 "b c"=$U\nEXPOSE 80 443/tcp\n'
        'CMD ["python3", "app.py"]\nENTRYPOINT tini\n'
    )
    user, label, expose, cmd, entry = found[1:]
    assert isinstance(user, ConfigStep) and user.user == "app:staff"
    assert isinstance(label, ConfigStep) and label.labels == (("a", "1"), ("b c", "app"))
    assert isinstance(expose, ConfigStep) and expose.expose == ("80", "443/tcp")
    assert isinstance(cmd, ConfigStep) and cmd.cmd == ("python3", "app.py")
    assert isinstance(entry, ConfigStep) and entry.entrypoint == ("/bin/sh", "-c", "tini")


def test_config_step_keys_follow_their_resolved_values() -> None:
    """The same ENV text with another build arg is another key."""
    one = steps("FROM d\nARG V\nENV X=$V\n", V="1")[-1]
    two = steps("FROM d\nARG V\nENV X=$V\n", V="2")[-1]
    assert isinstance(one, ConfigStep) and isinstance(two, ConfigStep)
    assert one.key() != two.key()
