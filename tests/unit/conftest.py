"""Fixtures the guest-agent unit tests share: the real agent on the host, and a client
connected to it. A module that defines its own ``client`` (the API tests) overrides it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from emberbox.agent_client.client import AgentClient
from tests.support.agent import RunningAgent, running_agent


@pytest.fixture
def agent() -> Iterator[RunningAgent]:
    with running_agent() as started:
        yield started


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    async with await agent.connect() as connected:
        yield connected
