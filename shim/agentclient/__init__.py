"""Host-side client of the pyvm guest agent: typed calls returning dataclasses (``client``),
dialing QEMU's chardev socket and waiting for the agent (``dial``).
"""

from shim.agentclient.client import TIMEOUTS, AgentClient
from shim.agentclient.dial import dial, wait_ready
from shim.agentclient.types import (
    AgentVersion,
    ContainerStats,
    CpuStats,
    ExitStatus,
    GuestDetails,
    GuestInterface,
    GuestRoute,
    MemInfo,
    MemoryOnlined,
    MemoryStats,
    Output,
    PidsStats,
    ProcessInfo,
    Stdio,
    TemplatePrepared,
)

__all__ = [
    "TIMEOUTS",
    "AgentClient",
    "AgentVersion",
    "ContainerStats",
    "CpuStats",
    "ExitStatus",
    "GuestDetails",
    "GuestInterface",
    "GuestRoute",
    "MemInfo",
    "MemoryOnlined",
    "MemoryStats",
    "Output",
    "PidsStats",
    "ProcessInfo",
    "Stdio",
    "TemplatePrepared",
    "dial",
    "wait_ready",
]
