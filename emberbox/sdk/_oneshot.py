"""One-shot runs: :func:`run_code` (blocking) and :func:`async_run_code` (asyncio), with
the same signatures, plus the languages the server offers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from emberbox.models.oneshot import LanguageList, LanguagePublic, RunResponse
from emberbox.sdk import _async, _calls, _sync
from emberbox.sdk._calls import CREATE_WAIT_S, Call

# A run waits for a sandbox (CREATE_WAIT_S), the compiler (the server's
# run_compile_timeout_s, 60 s by default) and the program itself.
COMPILE_WAIT_S = 120.0
RUN_DEFAULT_WAIT_S = 300.0  # no timeout given: the server's run_max_timeout_s (300 s)


class RunResult(RunResponse):
    """How a run ended: ``status`` (``ok``, ``runtime_error``, ``compile_error``,
    ``timeout``, ``memory_limit``, ``output_limit``), ``exit_code``, ``stdout``,
    ``stderr``, ``compile_output`` (text), ``time_ms`` and ``memory_kib``."""


class LanguageInfo(LanguagePublic):
    """A language the server runs: ``name``, ``version``, ``source_file``, ``compiled``."""


def run_call(
    language: str,
    code: str,
    files: Mapping[str, str] | None,
    stdin: str | None,
    args: Sequence[str] | None,
    timeout_s: float | None,
    memory_mib: int | None,
) -> Call:
    body: dict[str, Any] = {"language": language, "code": code}
    if files:
        body["files"] = [{"name": name, "content": text} for name, text in files.items()]
    if stdin is not None:
        body["stdin"] = stdin
    if args is not None:
        body["args"] = list(args)
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if memory_mib is not None:
        body["memory_mib"] = memory_mib
    run_wait = RUN_DEFAULT_WAIT_S if timeout_s is None else float(timeout_s)
    wait_s = CREATE_WAIT_S + COMPILE_WAIT_S + run_wait
    return Call("POST", "/v1/run", json=body, wait_s=wait_s)


def languages_call() -> Call:
    return Call("GET", "/v1/languages", wait_s=CREATE_WAIT_S)  # the first asks a sandbox


def parse_languages(response: httpx.Response) -> list[LanguageInfo]:
    found = _calls.parse(LanguageList, response).languages
    return [LanguageInfo.model_validate(item.model_dump()) for item in found]


def run_code(
    language: str,
    code: str,
    *,
    files: Mapping[str, str] | None = None,
    stdin: str | None = None,
    args: Sequence[str] | None = None,
    timeout_s: float | None = None,
    memory_mib: int | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> RunResult:
    """Compile (if needed) and run ``code`` once in a fresh sandbox on the server.

    ``language`` is one of :func:`list_languages` (``python3``, ``bash``, ``node``,
    ``c``, ``c++``). ``files`` maps relative names to text put next to the program;
    ``timeout_s`` (seconds, the run only, not the compile) and ``memory_mib`` (MiB) take
    the server's defaults (10 s, 256 MiB) when unset. The program's own failures come
    back as ``status``; an unknown language raises InvalidRequest.

    >>> run_code("python3", "print(6*7)").stdout
    '42\\n'
    >>> run_code("c", "int main(void){return 3;}").exit_code
    3
    """
    call = run_call(language, code, files, stdin, args, timeout_s, memory_mib)
    return _calls.parse(RunResult, _sync._send_once(call, url, api_key))


async def async_run_code(
    language: str,
    code: str,
    *,
    files: Mapping[str, str] | None = None,
    stdin: str | None = None,
    args: Sequence[str] | None = None,
    timeout_s: float | None = None,
    memory_mib: int | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> RunResult:
    """:func:`run_code` for asyncio.

    >>> (await async_run_code("node", "console.log(6*7)")).stdout
    '42\\n'
    """
    call = run_call(language, code, files, stdin, args, timeout_s, memory_mib)
    return _calls.parse(RunResult, await _async._send_once(call, url, api_key))


def list_languages(*, url: str | None = None, api_key: str | None = None) -> list[LanguageInfo]:
    """The languages the server runs, with their versions.

    >>> [lang.name for lang in list_languages()]
    ['python3', 'bash', 'node', 'c', 'c++']
    """
    return parse_languages(_sync._send_once(languages_call(), url, api_key))


async def async_list_languages(
    *, url: str | None = None, api_key: str | None = None
) -> list[LanguageInfo]:
    """:func:`list_languages` for asyncio."""
    return parse_languages(await _async._send_once(languages_call(), url, api_key))
