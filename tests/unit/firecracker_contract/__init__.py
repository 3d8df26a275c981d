"""Contract tests: every request the Firecracker driver sends must be valid for the real API.

The driver runs its full lifecycle against a fake ``firecracker``
(:mod:`tests.support.fakes_firecracker`: a Python script serving the API on a real unix
socket and a vsock-like socket), which records each request. Every recorded request is
then checked against Firecracker's Swagger file from ``../shared``
(:mod:`tests.support.firecracker_spec`): the (method, path) must exist and the body must
validate against its definition, with required fields enforced and
``additionalProperties: false`` added so that a field the spec does not define fails.
"""
