"""``POST /v1/run`` on the real server over real VMs of the polyglot image: every status
the issue names, in every language, and nothing left running afterwards."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from emberbox.images.registry import ImageInfo
from tests.support.paths import qemu_pids_under, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]

RUN_WAIT_S = 300.0  # the first run builds the image's template (one boot under TCG)
KILL_WAIT_S = 60.0  # a run's sandbox is killed after its answer, in the background

PROGRAMS = {
    "python3": "import sys\nprint('hello', sys.stdin.read().strip(), *sys.argv[1:])\n",
    "bash": 'read -r line\necho hello "$line" "$@"\n',
    "node": (
        "const input = require('fs').readFileSync(0, 'utf8').trim();\n"
        "console.log(['hello', input, ...process.argv.slice(2)].join(' '));\n"
    ),
    "c": (
        '#include <stdio.h>\n#include "greet.h"\n'
        "int main(int argc, char **argv) {\n"
        "  char line[64] = {0};\n  if (!fgets(line, sizeof line, stdin)) return 1;\n"
        '  line[strcspn(line, "\\n")] = 0;\n  printf("%s %s", GREETING, line);\n'
        '  for (int i = 1; i < argc; i++) printf(" %s", argv[i]);\n'
        '  printf("\\n");\n  return 0;\n}\n'
    ),
    "c++": (
        "#include <iostream>\n#include <string>\n"
        "int main(int argc, char **argv) {\n"
        "  std::string line;\n  std::getline(std::cin, line);\n"
        '  std::cout << "hello " << line;\n'
        '  for (int i = 1; i < argc; i++) std::cout << " " << argv[i];\n'
        "  std::cout << std::endl;\n}\n"
    ),
}
# Prints "warm" when the program was forked from the warm runtime (whose start-up
# imported ctypes, which `python3 main.py` never does by itself), "cold" otherwise.
WARM_MARK = "import os, sys\nprint('warm' if 'ctypes' in sys.modules else 'cold', flush=True)\n"
FILES = {"c": [{"name": "greet.h", "content": '#include <string.h>\n#define GREETING "hello"\n'}]}


@pytest.fixture(scope="module")
def server(polyglot_image: ImageInfo) -> Iterator[Server]:
    """One real server for the module (no warm pool: runs use the polyglot template)."""
    data_dir = short_tmp_dir("eb-run-")
    try:
        with serve_emberbox(data_dir, EMBERBOX_POOL_SIZE="0") as running:
            yield running
    finally:
        leftovers = qemu_pids_under(data_dir)
        for pid in leftovers:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
        assert not leftovers, f"runs left QEMU processes: {leftovers}"


def _run(server: Server, **body: Any) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=RUN_WAIT_S) as client:
        started = time.monotonic()
        response = client.post("/v1/run", json=body)
        took = time.monotonic() - started
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    print(f"{body['language']}: {answer['status']} in {took:.2f} s (run {answer['time_ms']} ms)")
    return answer


def _live_sandboxes(server: Server) -> list[str]:
    """The sandboxes still alive once the runs' kills (in the background, after each
    answer) had KILL_WAIT_S to end them."""
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        with server.client() as client:
            sandboxes = client.get("/v1/sandboxes").json()["sandboxes"]
        live = [s["id"] for s in sandboxes if s["state"] not in ("stopped", "error")]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


@pytest.mark.parametrize("language", list(PROGRAMS))
def test_a_correct_program_in_each_language(server: Server, language: str) -> None:
    """Each language reads stdin and args and prints; status ok, exit 0, no sandbox left."""
    answer = _run(
        server,
        language=language,
        code=PROGRAMS[language],
        files=FILES.get(language, []),
        stdin="world\n",
        args=["a", "b c"],
    )
    assert answer["status"] == "ok", answer
    assert answer["exit_code"] == 0
    assert answer["stdout"] == "hello world a b c\n"
    assert answer["time_ms"] > 0
    assert _live_sandboxes(server) == []


def test_a_c_compile_error(server: Server) -> None:
    """Broken C is compile_error with gcc's message; the program never runs."""
    answer = _run(server, language="c", code="int main(void) { return 0 }\n")
    assert answer["status"] == "compile_error", answer
    assert "error" in answer["compile_output"]
    assert answer["exit_code"] is None


def test_an_infinite_loop_times_out(server: Server) -> None:
    """A loop that never ends is timeout, killed at timeout_s (python3: the warm path)."""
    code = WARM_MARK + "while True:\n    pass\n"
    answer = _run(server, language="python3", code=code, timeout_s=2)
    assert answer["status"] == "timeout", answer
    assert answer["stdout"] == "warm\n"
    assert 2000 <= answer["time_ms"] < 10_000


def test_allocating_past_the_memory_limit(server: Server) -> None:
    """Touching 200 MiB under a 64 MiB limit is memory_limit (the guest's cgroup), on
    the warm path too: the forked child joined the run's group."""
    code = WARM_MARK + "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n"
    answer = _run(server, language="python3", code=code, memory_mib=64, timeout_s=20)
    assert answer["status"] == "memory_limit", answer
    assert answer["stdout"] == "warm\n"
    assert answer["memory_kib"] is None or answer["memory_kib"] <= 64 * 1024 + 1024


def test_printing_100_mib_is_output_limit(server: Server) -> None:
    """100 MiB of output is output_limit; stdout is cut at the server's cap (1 MiB)."""
    code = WARM_MARK + "for _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n"
    answer = _run(server, language="python3", code=code, timeout_s=60)
    assert answer["status"] == "output_limit", answer
    assert answer["stdout"].startswith("warm\nxxx")
    assert len(answer["stdout"]) == 1 << 20


# -- the warm path (python3 forked from the template's interpreter) ---------------------

IDENTITY = """
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
print(status['Uid'].split(), status['Gid'].split(), status['Groups'].strip() or '-')
print('no_new_privs', status['NoNewPrivs'].strip())
print(open('/proc/self/cgroup').read().strip().rsplit('/', 1)[0])
print(os.getcwd(), os.getpgid(0) == os.getpid() == os.getsid(0), sorted(os.environ))
print(sys.argv, __name__, __file__)
sys.exit(7)
"""


def test_a_warm_run_is_nobody_without_privileges_in_its_cgroup(server: Server) -> None:
    """The forked program runs as nobody (uid and gid 65534, no groups), with
    no_new_privs, in the run's cgroup, in its own session, in /tmp/run with the run's
    environment and argv; its exit code is the run's."""
    answer = _run(server, language="python3", code=WARM_MARK + IDENTITY, args=["x y"])
    assert answer["status"] == "runtime_error", answer
    assert answer["exit_code"] == 7 and answer["signal"] is None
    assert answer["stdout"].splitlines() == [
        "warm",
        str(["65534"] * 4) + " " + str(["65534"] * 4) + " -",
        "no_new_privs 1",
        "0::/emberbox",
        "/tmp/run True ['HOME', 'LANG', 'PATH', 'TERM']",
        "['main.py', 'x y'] __main__ /tmp/run/main.py",
    ]
    assert answer["stderr"] == ""


def test_a_warm_runtime_error_prints_the_programs_traceback(server: Server) -> None:
    """An uncaught exception is runtime_error, exit 1, with the traceback python3 would
    print (the program's frames only)."""
    code = WARM_MARK + "def f():\n    return 1 / 0\nf()\n"
    answer = _run(server, language="python3", code=code)
    assert answer["status"] == "runtime_error", answer
    assert answer["exit_code"] == 1 and answer["stdout"] == "warm\n"
    lines = answer["stderr"].splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1] == '  File "/tmp/run/main.py", line 5, in <module>'
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert "warm_zygote" not in answer["stderr"]


def test_nothing_leaks_from_one_warm_run_to_the_next(server: Server) -> None:
    """A file written and a global set by one run are absent in the next (every run has
    a fresh sandbox; the zygote's state is the template's)."""
    code = WARM_MARK + (
        "import builtins\n"
        "print(os.path.exists('/tmp/leak'), hasattr(builtins, 'LEAK'))\n"
        "open('/tmp/leak', 'w').write('x')\nbuiltins.LEAK = 1\n"
    )
    first = _run(server, language="python3", code=code)
    second = _run(server, language="python3", code=code)
    assert first["stdout"] == second["stdout"] == "warm\nFalse False\n", (first, second)
    assert first["status"] == second["status"] == "ok"
    assert _live_sandboxes(server) == []


def test_a_run_with_stdin_falls_back_to_a_normal_start(server: Server) -> None:
    """stdin is more than the warm runtime gives: python3 starts as usual, correctly."""
    code = WARM_MARK + "print(sys.stdin.read().upper(), end='')\nsys.exit(2)\n"
    answer = _run(server, language="python3", code=code, stdin="abc\n")
    assert answer["status"] == "runtime_error", answer
    assert (answer["exit_code"], answer["stdout"]) == (2, "cold\nABC\n")


@pytest.mark.parametrize(
    ("language", "code"),
    [("python3", "import sys\nsys.exit(3)\n"), ("c", "#include <stdlib.h>\nint main(){exit(3);}")],
)
def test_exit_3_is_a_runtime_error(server: Server, language: str, code: str) -> None:
    """exit(3) is runtime_error with exit_code 3."""
    answer = _run(server, language=language, code=code)
    assert answer["status"] == "runtime_error", answer
    assert answer["exit_code"] == 3


def test_unknown_language_and_the_language_list(server: Server) -> None:
    """An unknown language is a 400 listing them; /v1/languages has every version."""
    with server.client() as client:
        response = client.post("/v1/run", json={"language": "cobol", "code": ""})
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert all(name in message for name in ("python3", "bash", "node", "c", "c++"))
        languages = client.get("/v1/languages").json()["languages"]
    versions = {lang["name"]: lang["version"] for lang in languages}
    assert set(versions) == {"python3", "bash", "node", "c", "c++"}
    assert all(versions.values()), versions
    assert _live_sandboxes(server) == []


def test_the_program_runs_as_nobody_in_a_writable_directory(server: Server) -> None:
    """The program may write next to itself, and `kill -9 -1` reaches only its own
    processes (as root it would end the guest agent, and the run would fail with 502)."""
    code = "echo data > out.txt && cat out.txt && id -u\nkill -9 -1\necho survived\n"
    answer = _run(server, language="bash", code=code)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "data\n65534\nsurvived\n"


def test_files_too_big_for_one_agent_frame_still_arrive(server: Server) -> None:
    """600 kB of extra files (more than the run request may carry inline) go by tar_in
    first; the program, warm, reads them."""
    code = WARM_MARK + "print(len(open('data.txt').read()))\n"
    files = [{"name": "data.txt", "content": "x" * 600_000}]
    answer = _run(server, language="python3", code=code, files=files)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "warm\n600000\n"
