"""Regression: in gRPC mode QEMU was reported "killed by SIGSEGV" before its QMP socket appeared.

The shim's spawn ran Python (a ``preexec_fn`` setting PR_SET_PDEATHSIG) between fork and exec, inside a
process full of grpcio threads. Spawning must not run Python in the child.
"""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import asyncio, sys, tempfile
    from pathlib import Path
    import grpc
    from shim.hypervisor.qemu.process import spawn

    async def echo(request, context):
        await asyncio.sleep(0.001)
        return request

    async def main():
        addr = "unix:" + tempfile.mktemp(prefix="pyvm-grpc-")
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(addr)
        await server.start()
        channel = grpc.aio.insecure_channel(addr)
        call = channel.unary_unary("/t.T/Echo")
        stop = asyncio.Event()

        async def traffic():  # RPCs in flight while we fork, as Create is while QEMU starts
            while not stop.is_set():
                await call(b"x" * 64)

        workers = [asyncio.create_task(traffic()) for _ in range(4)]
        log = Path(tempfile.mkdtemp()) / "log"
        bad = []
        for _ in range(int(sys.argv[1])):
            child = await spawn("true", ["true"], log)
            rc = await child.exited
            if rc != 0:
                bad.append(rc)
        stop.set()
        await asyncio.gather(*workers)
        await channel.close()
        await server.stop(None)
        print("bad", bad)
        sys.exit(1 if bad else 0)

    asyncio.run(main())
    """
)


def test_spawn_from_a_process_with_grpc_threads_never_crashes_the_child() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD, "150"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout[-500:], r.stderr[-2000:])
