"""``python3 -m emberbox_guest`` (in the guest) or ``python -m emberbox.guest``: the agent."""

from __future__ import annotations

from .agent import main

if __name__ == "__main__":
    raise SystemExit(main())
