"""The sandbox manager, reaper and reconciler against a fake sandbox (no VMs;
:mod:`tests.support.fakes_sandbox`)."""
