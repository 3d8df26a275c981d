"""The HTTP layer over a fake in-memory manager (:mod:`tests.support.fakes_manager`):
status codes, bodies, OpenAPI."""
