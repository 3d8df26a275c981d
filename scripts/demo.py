"""`make run`: boot a real sandbox and run code in it; what it prints comes from the guest."""

from __future__ import annotations

import asyncio
import platform

from emberbox.config import Settings
from emberbox.service.sandbox import Sandbox


async def main() -> None:
    async with Sandbox.boot(settings=Settings()) as sb:
        result = await sb.exec(["sh", "-c", "uname -r; python3 -c 'print(6*7)'"])
        print(f"host kernel:  {platform.release()}")
        print(f"guest says:   {result.stdout.decode().strip()!r} (exit {result.exit_code})")


if __name__ == "__main__":
    asyncio.run(main())
