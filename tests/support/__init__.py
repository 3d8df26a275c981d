"""Fakes, servers and factories the tests share (type-checked by mypy).

Test modules import from here, never from each other; fixtures stay in conftest.py.

- ``paths``: REPO, short temp dirs, the processes that mention a path
- ``servers``: ``emberbox serve`` in a subprocess, an ASGI app under uvicorn in a thread
- ``agent``: the real guest agent run on the host, on a unix socket
- ``fakes_guest``: a guest agent in memory (``AgentCalls``)
- ``fakes_manager``: SandboxManager and ImageRegistry in memory, and the app over them
- ``fakes_sandbox``: sandboxes, their start/attach, the image catalog, pooled things
- ``fakes_run``: managers for one-shot runs
- ``fakes_vmm``: a VMM process that never ends
- ``fakes_firecracker``, ``firecracker_spec``: a fake ``firecracker`` and ``jailer`` that
  record their requests, and Firecracker's API spec as a validator
- ``firecracker_bin``: the Firecracker the tests run (../shared/firecracker/bin, else
  PATH) and why Firecracker VM tests skip on a host where no guest boots
- ``sandbox_manager``: the real SandboxManager over ``fakes_sandbox``, stale rows
- ``api_calls``: the unit tests' calls to the app in-process (errors, NDJSON, processes)
- ``server_calls``: the integration tests' calls to a real server, and the CLI's argv
- ``rows``: store rows
- ``network``: network targets on this machine and the guest-side probe
- ``hostile``, ``measure``: the hostile suite's servers, checks and host measurements

Each fake is checked against the Protocol it stands in for, in an ``if TYPE_CHECKING:``
block at the end of its module.
"""
