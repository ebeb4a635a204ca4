"""``containerd-shim-pyvm-v2``: argv -> ``start`` | ``delete`` | serve | ``-v``.

containerd passes Go ``flag``-style options before the action word
(``-namespace NS -address A -publish-binary B -id ID [-bundle DIR] [-debug] start|delete``); no action
means "be the serving daemon". Kept tiny and import-light: ``start`` must answer within ~150 ms
and print nothing but its answer (stdout and stderr are read together by containerd).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from shim.api.bootstrap import Flags, UsageError

_STRING_FLAGS = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",
    "debug-socket": None,  # accepted for compatibility, unused
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "version": "version"}


def parse(argv: Sequence[str]) -> Flags:
    """Go ``flag`` semantics: ``-f v``, ``-f=v``, ``--f``; bools as ``-b`` or ``-b=true``; parsing
    stops at the first non-flag word (the action) or ``--``.

    :raises UsageError: unknown flag, missing value, more than one action.
    """
    flags = Flags()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            on = value.lower() in ("", "1", "t", "true") if eq else True
            setattr(flags, _BOOL_FLAGS[name], on)
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args[i]
            attr = _STRING_FLAGS[name]
            if attr is not None:
                setattr(flags, attr, value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = args[i:]
    if len(rest) > 1:
        raise UsageError(f"one action expected, got {rest}")
    flags.action = rest[0] if rest else ""
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    try:
        flags = parse(sys.argv[1:] if argv is None else argv)
        if flags.action in ("start", "delete"):
            warnings.simplefilter("ignore")  # a warning on stderr would corrupt the answer
        if flags.version:
            from shim import __version__

            sys.stdout.write(
                f"containerd-shim-pyvm-v2:\n  Version: {__version__}\n  Runtime: io.containerd.pyvm.v2\n"
            )
            return 0
        if flags.action == "start":
            from shim.api.bootstrap import start

            sys.stdout.write(start(flags))
            sys.stdout.flush()
            return 0
        if flags.action == "delete":
            from shim.api.bootstrap import delete

            data, problems = delete(flags)
            for w in problems:
                sys.stderr.write(w + "\n")
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return 0
        if flags.action:
            raise UsageError(f"unknown action {flags.action!r}: expected start or delete (or none to serve)")
        from shim.api.daemon import serve

        return serve(flags)
    except UsageError as exc:
        sys.stderr.write(f"containerd-shim-pyvm-v2: {exc}\n")
        return 1
    except Exception as exc:  # start/delete must answer with one line, never a traceback
        sys.stderr.write(f"containerd-shim-pyvm-v2: {type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
