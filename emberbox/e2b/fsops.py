"""envd's filesystem operations, run in the guest as the calling user.

Stat, ListDir, MakeDir, Move and Remove run one small standard-library Python program
(:data:`HELPER`) in the guest through ``manager.exec``, as the calling user (the
spec's ``user``, see users.py): it answers E2B's EntryInfo (owner and group names,
permission string, symlink target) and the guest's own permission checks apply, as they do in envd.
"""

from __future__ import annotations

import json
from typing import Any

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.e2b.front import HELPER_TIMEOUT_S, EnvdCall
from emberbox.e2b.users import User

# EntryInfo of a path (the helper's and the watchers'): the target's type and size for a
# symlink, owner and group names, and the user.e2b.* extended attributes as metadata.
ENTRY = r"""
import datetime, grp, os, pwd, stat
def name(fn, i):
    try: return fn(i)[0]
    except KeyError: return str(i)
def entry(p):
    ls = os.lstat(p); st = ls; target = None
    if stat.S_ISLNK(ls.st_mode):
        target = os.path.realpath(p)
        try: st = os.stat(p)
        except OSError: pass
    e = {"name": os.path.basename(p) or "/", "path": p,
         "type": "FILE_TYPE_DIRECTORY" if stat.S_ISDIR(st.st_mode) else "FILE_TYPE_FILE",
         "size": str(st.st_size), "mode": stat.S_IMODE(st.st_mode),
         "permissions": stat.filemode(st.st_mode),
         "owner": name(pwd.getpwuid, st.st_uid), "group": name(grp.getgrgid, st.st_gid),
         "modifiedTime": datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
             .isoformat().replace("+00:00", "Z")}
    if target is not None: e["symlinkTarget"] = target
    try:
        md = {a[9:]: os.getxattr(p, a).decode(errors="replace")
              for a in os.listxattr(p) if a.startswith("user.e2b.")}
    except OSError: md = {}
    if md: e["metadata"] = md
    return e
"""

HELPER = (
    ENTRY
    + r"""
import json, shutil, sys
def walk(p, depth, out):
    for n in sorted(os.listdir(p)):
        c = os.path.join(p, n); out.append(entry(c))
        if depth > 1 and os.path.isdir(c) and not os.path.islink(c): walk(c, depth - 1, out)
def run(req):
    op, p = req["op"], req.get("path")
    if op == "stat": return {"entry": entry(p)}
    if op == "list":
        os.stat(p)
        if not os.path.isdir(p): raise NotADirectoryError(20, "not a directory", p)
        out = []; walk(p, max(1, int(req.get("depth") or 1)), out); return {"entries": out}
    if op == "mkdir":
        if os.path.isdir(p): return {"exists": True}
        os.makedirs(p); return {"entry": entry(p)}
    if op == "move":
        d = req["destination"]; os.lstat(req["source"])
        os.makedirs(os.path.dirname(d) or "/", exist_ok=True)
        os.rename(req["source"], d); return {"entry": entry(d)}
    if op == "remove":
        if os.path.isdir(p) and not os.path.islink(p): shutil.rmtree(p)
        elif os.path.lexists(p): os.unlink(p)
        return {}
    raise ValueError("unknown op " + op)
def fail(code, e):
    print(json.dumps({"error": code, "message": f"{e.filename or ''}: {e.strerror or e}"}))
try: print(json.dumps(run(json.loads(sys.argv[1]))))
except FileNotFoundError as e: fail("not_found", e)
except FileExistsError as e: fail("already_exists", e)
except PermissionError as e: fail("permission_denied", e)
except OSError as e: fail("invalid_argument", e)
except ValueError as e: print(json.dumps({"error": "invalid_argument", "message": str(e)}))
"""
)

CODE_ERRORS: dict[str, type[errors.EmberboxError]] = {
    "not_found": errors.NotFound,
    "already_exists": errors.Conflict,
    "invalid_argument": errors.InvalidRequest,
}


class PermissionDenied(errors.EmberboxError):
    status_code = 403


async def run(call: EnvdCall, user: User, op: str, **args: Any) -> dict[str, Any]:
    """One helper operation as ``user``; its errors as emberbox errors (NotFound,
    Conflict for an existing directory, PermissionDenied, InvalidRequest)."""
    request = json.dumps({"op": op, **args})
    argv = ["python3", "-I", "-S", "-c", HELPER, request]
    spec = ExecSpec(argv, env=user.env(), cwd="/", timeout_s=HELPER_TIMEOUT_S, user=user.run_as())
    result = await call.front.manager.exec(call.sandbox_id, spec)
    try:
        answer = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = result.stderr.decode(errors="replace")[-500:]
        raise errors.AgentRequestFailed(f"filesystem {op} failed: {tail}") from None
    if not isinstance(answer, dict):
        raise errors.AgentRequestFailed(f"filesystem {op}: malformed answer")
    code = answer.get("error")
    if code == "permission_denied":
        raise PermissionDenied(str(answer.get("message")))
    if isinstance(code, str):
        raise CODE_ERRORS.get(code, errors.InvalidRequest)(str(answer.get("message")))
    return answer
