"""Reaching the agent: connect to QEMU's chardev socket of the agent port and wait until it answers.

QEMU listens on the unix socket (``server=on``); data the host writes before the guest agent opened
its end of the port is held by QEMU, so a Health call sent early is answered once the agent is up.
Each attempt still has a short deadline so a connection that broke meanwhile is noticed and redialed.
"""

from __future__ import annotations

import asyncio
import os
import time

from shim.agentclient.client import AgentClient
from shim.errors import DeadlineExceeded, ShimError, Unavailable
from shim.log import get_logger
from shim.ttrpc import Client

log = get_logger(__name__)

_RETRY = 0.05
#: the first Health attempt's timeout (times the timeout factor); it doubles up to attempt_timeout
FIRST_ATTEMPT = 0.2


async def dial(path: str | os.PathLike[str], *, deadline: float, timeout_factor: float = 1.0) -> AgentClient:
    """Connect to the unix socket ``path``, retrying until ``deadline`` (``time.monotonic()``).

    Raises ``DeadlineExceeded`` naming the last error if nothing accepted in time.
    """
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"cannot connect to the agent socket {path}: {last}", path=os.fspath(path))
        try:
            ttrpc = await Client.connect_unix(path, timeout=min(remaining, 5.0))
            return AgentClient(ttrpc, timeout_factor=timeout_factor)
        except (Unavailable, OSError) as exc:
            last = exc
        await asyncio.sleep(min(_RETRY, max(0.0, deadline - time.monotonic())))


async def wait_ready(
    path: str | os.PathLike[str],
    *,
    deadline: float,
    timeout_factor: float = 1.0,
    attempt_timeout: float = 2.0,
) -> AgentClient:
    """Dial ``path`` and call Health.Check until it answers SERVING; return the connected client.

    A broken connection is redialed; each attempt waits ``attempt_timeout * timeout_factor``.
    Raises ``DeadlineExceeded`` at ``deadline`` (``time.monotonic()``) with the last error.
    """
    client: AgentClient | None = None
    last: Exception | None = None
    # Start short, double up to attempt_timeout: a Health sent while the guest port was open but the
    # agent was about to close it (its open-check-close loop while no host is connected; a template
    # saved at that moment replays it at every restore) is discarded by the guest kernel with the
    # port. The next attempt on the same connection is answered at once; a fixed 2 s x factor first
    # attempt made such a pod wait 6.2 s under TCG.
    attempt = min(FIRST_ATTEMPT, attempt_timeout)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"the guest agent did not answer Health in time: {last}", path=os.fspath(path)
                )
            if client is None or client.closed:
                if client is not None:
                    await client.close()
                client = await dial(path, deadline=deadline, timeout_factor=timeout_factor)
            try:
                if await client.check(timeout=min(remaining, attempt * timeout_factor)):
                    ready, client = client, None
                    return ready
                last = Unavailable("agent reports NOT_SERVING")
            except (DeadlineExceeded, Unavailable) as exc:
                last = exc
                attempt = min(attempt * 2, attempt_timeout)
            except ShimError as exc:
                last = exc
                log.debug("agent health check failed", error=str(exc))
            await asyncio.sleep(min(_RETRY, max(0.0, deadline - time.monotonic())))
    finally:
        if client is not None:
            await client.close()
