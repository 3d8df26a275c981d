"""Cluster mode (docs/cluster.md): many VM hosts behind stateless API replicas, on Ray.

- ``agent``: :class:`HostAgent`, the Ray actor on each host; it starts and owns that
  host's unmodified single-host ``emberbox serve`` and reports its capacity.
- ``hosts``: :class:`Cluster` (an API replica's view of the hosts: status, endpoints,
  drain) and :func:`start_host` (registers a host's detached actor).
- ``placement``: which host takes a new sandbox (pure).
- ``monitor``: :class:`HostMonitor`, host liveness and reconciliation against the index.

Ray is imported only inside functions of this package: importing ``emberbox.cluster``
costs nothing, and the single-host server never loads Ray.
"""
