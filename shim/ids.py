"""Identifier validation: done once, at the edge, so every layer below can build paths from ids."""

from __future__ import annotations

import re

from shim.errors import InvalidArgument

MAX_ID_LENGTH = 76
# containerd's own identifiers: alphanumerics with '.', '_', '-' separators, not leading.
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")


def validate_id(value: str, *, kind: str = "id") -> str:
    """Return ``value`` if it is a safe container/exec/sandbox id.

    :raises InvalidArgument: when empty, too long, or containing '/', '..' or other characters
        that could escape a directory.
    """
    if not value:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{kind} {value[:20]!r}... is {len(value)} characters long; at most {MAX_ID_LENGTH} are allowed"
        )
    if not _ID_RE.match(value):
        raise InvalidArgument(
            f"{kind} {value!r} is invalid: use letters, digits and single '.', '_' or '-' between them "
            "(no '/', no '..', no leading or trailing separator)"
        )
    return value


__all__ = ["MAX_ID_LENGTH", "validate_id"]
