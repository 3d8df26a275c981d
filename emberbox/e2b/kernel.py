"""The code interpreter's kernel: a small standard-library program run in the guest (no
Jupyter). :data:`KERNEL` is one context: a process that keeps one Python namespace and
serves executions one at a time on a TCP port of the guest's loopback, which it writes
to a file once it listens. An execution is one connection (carried by the agent, as
``manager.ports`` carries any guest port): the request (JSON) until end of file, then
the answer, one JSON line per output. A context lives in the guest only: its port file
and a small description file under :data:`KERNEL_DIR`, named by its id, so no host state
is needed.

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
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(8)
with open(path + ".tmp", "w") as port_file: port_file.write(str(server.getsockname()[1]))
os.rename(path + ".tmp", path)
while True:
    conn, _ = server.accept()
    with conn:
        data = b""
        while chunk := conn.recv(65536): data += chunk
        try: run(conn, json.loads(data or b"{}"))
        except OSError: pass
"""
