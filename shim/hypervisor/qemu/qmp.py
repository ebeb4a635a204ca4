"""A thin typed adapter over ``qemu.qmp.QMPClient`` that speaks our errors.

Error mapping (at this boundary only, ``raise ... from exc``):

- ``ExecuteError`` (QEMU answered with an error) → :class:`QMPCommandError` with ``error_class`` and
  ``desc`` facts, the command and its arguments;
- connection problems (``ConnectError``, ``StateError``, ``ExecInterruptedError``, EOF, OSError) →
  :class:`Unavailable`;
- a command or event wait that outlives its deadline → :class:`DeadlineExceeded`.

Events: one background task drains the library's default listener and fans events out to the
subscriptions that are open at that moment. Open a subscription *before* sending the command whose
event you wait for (``async with qmp.subscribe("DEVICE_DELETED") as sub: await qmp.device_del(..);
await sub.wait(pred, timeout)``), so an early event is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
    StateError,
)

from shim.errors import DeadlineExceeded, QMPCommandError, Unavailable
from shim.log import get_logger

log = get_logger("pyvm.hypervisor.qmp")
# the library logs every disconnect as an error; our own layer reports what matters
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

Event = Mapping[str, Any]
Predicate = Callable[[Event], bool]


class Subscription:
    """Events of the given names received while the subscription is open."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def wait(self, predicate: Predicate | None = None, timeout: float = 10.0) -> Event:  # noqa: ASYNC109
        """The next matching event. Raises DeadlineExceeded, or Unavailable if QMP disconnects."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ev = await self.queue.get()
                    if ev is None:
                        raise Unavailable(
                            "QMP connection closed while waiting for " + "/".join(sorted(self.names))
                        )
                    if predicate is None or predicate(ev):
                        return ev
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"no QMP event {'/'.join(sorted(self.names))} within {timeout:g} s", timeout=timeout
            ) from exc

    def pending(self) -> list[Event]:
        out: list[Event] = []
        while not self.queue.empty():
            ev = self.queue.get_nowait()
            if ev is not None:
                out.append(ev)
        return out


class Qmp:
    """One QMP connection. Not reusable after :meth:`close`."""

    def __init__(self, name: str = "pyvm", *, command_timeout: float = 10.0) -> None:
        self._client = QMPClient(name)
        self._subs: set[Subscription] = set()
        self._pump: asyncio.Task[None] | None = None
        self.command_timeout = command_timeout
        self.disconnected = asyncio.Event()

    async def connect(self, socket: Path, timeout: float) -> None:  # noqa: ASYNC109
        """Connect and negotiate. Raises Unavailable (refused/absent) or DeadlineExceeded."""
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(str(socket))
        except TimeoutError as exc:
            raise DeadlineExceeded(f"QMP at {socket} did not answer within {timeout:g} s") from exc
        except (ConnectError, OSError, StateError) as exc:
            raise Unavailable(f"cannot connect to QMP at {socket}: {exc}", socket=str(socket)) from exc
        self._pump = asyncio.create_task(self._pump_events(), name=f"qmp-events-{socket.parent.name}")

    async def _pump_events(self) -> None:
        listener: EventListener = self._client.events
        try:
            while True:
                get = asyncio.ensure_future(listener.get())
                changed = asyncio.ensure_future(self._client.runstate_changed())
                done, _ = await asyncio.wait({get, changed}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    changed.cancel()
                    msg = get.result()
                    ev = {
                        "event": msg["event"],
                        "data": msg.get("data", {}),
                        "timestamp": msg.get("timestamp"),
                    }
                    for sub in list(self._subs):
                        if ev["event"] in sub.names:
                            sub.queue.put_nowait(ev)
                else:
                    get.cancel()
                    from qemu.qmp import Runstate

                    if self._client.runstate in (Runstate.DISCONNECTING, Runstate.IDLE):
                        break
        finally:
            self.disconnected.set()
            for sub in list(self._subs):
                sub.queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(self, *names: str) -> AsyncIterator[Subscription]:
        sub = Subscription(frozenset(names))
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        t = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(t):
                return await self._client.execute(cmd, dict(args) if args else None)
        except ExecuteError as exc:
            raise QMPCommandError(
                f"QMP {cmd} failed: {exc.error_class}: {exc}",
                command=cmd,
                arguments=dict(args or {}),
                error_class=exc.error_class,
                desc=str(exc),
            ) from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(f"QMP {cmd} did not answer within {t:g} s", command=cmd) from exc
        except (ExecInterruptedError, StateError, ConnectError, EOFError, OSError) as exc:
            raise Unavailable(f"QMP connection lost during {cmd}: {exc}", command=cmd) from exc
        except QMPError as exc:
            raise Unavailable(f"QMP protocol error during {cmd}: {exc}", command=cmd) from exc

    async def close(self) -> None:
        # after QEMU exits the library re-raises the reader's EOFError here: the socket is gone either way
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self.disconnected.set()

    # -- typed commands --------------------------------------------------------------------------

    async def query_status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def object_add(self, qom_type: str, obj_id: str, **props: object) -> None:
        await self.execute("object-add", {"qom-type": qom_type, "id": obj_id, **props})

    async def object_del(self, obj_id: str) -> None:
        await self.execute("object-del", {"id": obj_id})

    async def device_add(self, driver: str, dev_id: str, **props: object) -> None:
        await self.execute("device_add", {"driver": driver, "id": dev_id, **props})

    async def device_del(self, dev_id: str) -> None:
        await self.execute("device_del", {"id": dev_id})

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def qom_set(self, path: str, prop: str, value: object) -> None:
        await self.execute("qom-set", {"path": path, "property": prop, "value": value})

    async def query_memory_devices(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-memory-devices"))

    async def query_memory_size_summary(self) -> dict[str, int]:
        return dict(await self.execute("query-memory-size-summary"))

    async def set_migration_capabilities(self, **caps: bool) -> None:
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]},
        )

    async def query_migrate(self) -> dict[str, Any]:
        return dict(await self.execute("query-migrate"))

    async def system_powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        """Ask QEMU to exit. The connection drops as it does; that is success, not an error."""
        with contextlib.suppress(Unavailable):
            await self.execute("quit")


__all__ = ["Event", "Qmp", "Subscription"]
