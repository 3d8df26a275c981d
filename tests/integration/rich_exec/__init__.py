"""Streamed exec, background processes, terminals and files through a real
``emberbox serve`` over real VMs (HTTP, the SDK and the CLI)."""
