"""The code interpreter's kernel: two small standard-library programs run in the guest
(no Jupyter). :data:`KERNEL` is one context: a process that keeps one Python namespace
and serves executions one at a time on a unix socket. :data:`CLIENT` is one execution:
it sends its stdin (the request) to the socket and copies the answer, one JSON line per
output, to its stdout. A context lives in the guest only: its socket and a small
description file under :data:`KERNEL_DIR`, named by its id, so no host state is needed.

Lines of an execution (the code interpreter's NDJSON, without timestamps)::

    {"type": "stdout" | "stderr", "text": ...}
    {"type": "result", "text": repr(value), "is_main_result": true}
    {"type": "error", "name": ..., "value": ..., "traceback": ...}
    {"type": "number_of_executions", "execution_count": n}
    {"type": "end_of_execution"}
"""

from __future__ import annotations

KERNEL_DIR = "/tmp/.e2b-kernels"

KERNEL = r"""
import ast, io, json, os, socket, sys, threading, traceback
path = sys.argv[1]
namespace = {"__name__": "__main__"}
count = 0
class Stream(io.TextIOBase):
    def __init__(self, kind): self.kind = kind; self.conn = None; self.held = ""
    def writable(self): return True
    def write(self, text):
        self.held += text
        if "\n" in self.held:
            ready, _, self.held = self.held.rpartition("\n")
            self.emit(ready + "\n")
        return len(text)
    def flush(self):
        if self.held: self.emit(self.held); self.held = ""
    def emit(self, text):
        if self.conn is not None: send(self.conn, {"type": self.kind, "text": text})
def send(conn, message):
    conn.sendall((json.dumps(message) + "\n").encode())
out, err = Stream("stdout"), Stream("stderr")
def run(conn, request):
    global count
    count += 1
    out.conn = err.conn = conn
    saved = dict(os.environ); os.environ.update(request.get("env_vars") or {})
    sys.stdout, sys.stderr = out, err
    try:
        tree = ast.parse(request.get("code") or "", "<cell>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                send(conn, {"type": "result", "text": repr(value), "is_main_result": True})
    except BaseException as exc:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        send(conn, {"type": "error", "name": type(exc).__name__, "value": str(exc),
                    "traceback": "".join(lines)})
    finally:
        out.flush(); err.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        out.conn = err.conn = None
        os.environ.clear(); os.environ.update(saved)
    send(conn, {"type": "number_of_executions", "execution_count": count})
    send(conn, {"type": "end_of_execution"})
try: os.unlink(path)
except FileNotFoundError: pass
server = socket.socket(socket.AF_UNIX); server.bind(path); server.listen(8)
while True:
    conn, _ = server.accept()
    with conn:
        data = b""
        while chunk := conn.recv(65536): data += chunk
        try: run(conn, json.loads(data or b"{}"))
        except OSError: pass
"""

CLIENT = r"""
import json, socket, sys
try:
    conn = socket.socket(socket.AF_UNIX); conn.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"type": "error", "name": "ContextNotRunning", "value": str(exc),
                      "traceback": "the context's kernel is not running: restart it"}))
    sys.exit(1)
conn.sendall(sys.stdin.buffer.read()); conn.shutdown(socket.SHUT_WR)
while chunk := conn.recv(65536):
    sys.stdout.buffer.write(chunk); sys.stdout.flush()
"""
