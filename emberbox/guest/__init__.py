"""The guest agent: the program that runs inside a sandbox VM as PID 1 (stdlib only).

A package of its own: its modules import one another relatively and nothing but the
standard library (tests/unit/test_guest_package.py checks), so it runs under whatever
name it is installed as. The image installs every module of it as
``/opt/emberbox/emberbox_guest/`` and the initramfs starts it with
``python3 -m emberbox_guest``; on the host, tests run it as ``python -m emberbox.guest``.
The host side uses :mod:`.protocol` (the framing and the ``Op`` enum) from here.
"""
