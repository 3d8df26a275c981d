"""The E2B front: the unmodified E2B SDK (``e2b==2.63.0``, ``e2b-code-interpreter``)
against emberbox, served under ``/e2b`` by ``emberbox serve`` (docs/e2b.md).

``control.py`` is E2B's control plane (``E2B_API_URL``), ``envd.py`` the in-sandbox API
(``E2B_SANDBOX_URL``: processes, files, health), ``interpreter.py`` the code interpreter.
They call the service layer as the API does; ``envelope.py`` and ``query.py`` are pure.
"""
