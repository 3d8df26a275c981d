"""The API replica of a cluster (``emberbox serve --cluster``; docs/cluster.md): the
native API's routes answered from the shared index or relayed to the owning host.

- :mod:`.app`: the factory, :func:`create_cluster_app`
- :mod:`.sandboxes`: create (placement), list, get, kill, timeout, pause, resume, snapshots
- :mod:`.passthrough`: every other sandbox route, relayed (the table from the native routers)
- :mod:`.sockets` + :mod:`.relay`: terminals and port WebSockets, relayed
- :mod:`.system`: health, runs, images, languages, the admin routes, what is not served
- :mod:`.proxy`: HTTP streamed to a host and back; :mod:`.context`: what routes get
"""

from __future__ import annotations

from emberbox.api.cluster.app import create_cluster_app

__all__ = ["create_cluster_app"]
