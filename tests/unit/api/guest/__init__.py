"""The HTTP layer of streamed exec, background processes, files and terminals, over the
real process and file services and a fake guest: status codes, NDJSON framing, OpenAPI."""
