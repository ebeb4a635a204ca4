"""Registering pyvm in containerd's ``config.toml``: pure functions over tomlkit documents.

Nothing here touches the filesystem (see ``shim.install.installer``). Editing goes through tomlkit so
comments, ordering and every other setting of the file survive, and a document we do not change
renders to exactly the bytes it was parsed from.

containerd config schema versions (containerd ``services/server/config``):
- ``version = 2`` (containerd 1.6/1.7): CRI plugin ``io.containerd.grpc.v1.cri``.
- ``version = 3`` (containerd 2.x): CRI runtime plugin ``io.containerd.cri.v1.runtime``.
- no ``version`` key: schema 1 (plugin ``cri``), which we refuse to edit rather than guess.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.container import Container
from tomlkit.items import InlineTable, Table

from shim.errors import InvalidArgument

RUNTIME_NAME = "pyvm"
RUNTIME_TYPE = "io.containerd.pyvm.v2"
POD_ANNOTATIONS = ("io.pyvm.*",)
SUPPORTED_VERSIONS = (2, 3)
#: containerd's built-in ``default_runtime_name``
DEFAULT_RUNTIME = "runc"
_RUNC_KEYS = {"runtime_type": "io.containerd.runc.v2"}

#: where the CRI runtimes table lives, by config schema version
_RUNTIMES_PATH: dict[int, tuple[str, ...]] = {
    2: ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes"),
    3: ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes"),
}


@dataclass(frozen=True)
class RuntimeEntry:
    """The values pyvm owns in ``[...containerd.runtimes.<name>]``.

    Keys a user added to the table by hand (``runtime_path``, ``container_annotations``, ...) are left
    alone; only these are compared and written.
    """

    config_path: str
    name: str = RUNTIME_NAME
    runtime_type: str = RUNTIME_TYPE
    pod_annotations: tuple[str, ...] = POD_ANNOTATIONS
    privileged_without_host_devices: bool = True
    #: absolute path of the shim binary, for nodes where it is not on containerd's PATH
    runtime_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def managed_keys(self) -> dict[str, Any]:
        keys: dict[str, Any] = {
            "runtime_type": self.runtime_type,
            "pod_annotations": list(self.pod_annotations),
            "privileged_without_host_devices": self.privileged_without_host_devices,
        }
        if self.runtime_path:
            keys["runtime_path"] = self.runtime_path
        keys.update(self.extra)
        return keys

    def managed_options(self) -> dict[str, Any]:
        return {"ConfigPath": self.config_path}


def runtimes_path(version: int) -> tuple[str, ...]:
    return _RUNTIMES_PATH[version]


def table_header(version: int, name: str = RUNTIME_NAME) -> str:
    """The TOML header of our table, as a user would search for it in the file."""
    return ".".join(_quote_key(k) for k in (*runtimes_path(version), name))


def parse(text: str, source: str) -> tomlkit.TOMLDocument:
    """Parse containerd's config, raising ``InvalidArgument`` that names ``source`` and the fix."""
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise InvalidArgument(
            f"{source} is not valid TOML (line {exc.line}, column {exc.col}: {_parse_reason(exc)}); "
            f"containerd cannot load it either. Fix the file (or move it away to start from a fresh one) "
            f"and run again",
            path=source,
            line=exc.line,
            col=exc.col,
        ) from exc


def is_blank(doc: tomlkit.TOMLDocument) -> bool:
    """True if the document holds no keys at all (only comments/whitespace, or nothing)."""
    return len(doc) == 0


def schema_version(doc: tomlkit.TOMLDocument, source: str) -> int:
    """The config schema version of ``doc``; raises ``InvalidArgument`` for ones we do not edit."""
    version = doc.get("version")
    if version is None:
        raise InvalidArgument(
            f"{source} has no 'version' key, so containerd reads it as a schema-1 config, which pyvm does "
            f"not edit. Migrate it to 'version = 2' (containerd 1.6/1.7; on 1.7 `containerd config migrate` "
            f"does it) or 'version = 3' (containerd 2.x) and run again",
            path=source,
        )
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(
            f"{source}: config version {version!r} is not supported; pyvm edits version 2 (containerd "
            f"1.6/1.7) and version 3 (containerd 2.x)",
            path=source,
            version=str(version),
        )
    return int(version)


def new_document(version: int) -> tomlkit.TOMLDocument:
    """A fresh config: only the schema version (``apply`` adds runc next to pyvm, see
    ``default_runtime_missing``); every other setting keeps containerd's built-in default."""
    if version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(f"config version {version} is not supported (use 2 or 3)", version=version)
    return tomlkit.parse(
        "# containerd configuration written by `pyvm install` (no config existed before).\n"
        "# `pyvm uninstall` deletes this file again if it is unchanged.\n"
        f"version = {version}\n\n"
    )


def find_runtime(doc: tomlkit.TOMLDocument, version: int, name: str = RUNTIME_NAME) -> Any | None:
    """The ``runtimes.<name>`` table, or None."""
    return _lookup(doc, (*runtimes_path(version), name))


def entry_matches(doc: tomlkit.TOMLDocument, version: int, entry: RuntimeEntry) -> bool:
    """True if ``doc`` already registers ``entry`` with every value pyvm manages."""
    table = find_runtime(doc, version, entry.name)
    if table is None or default_runtime_missing(doc, version):
        return False
    for key, want in entry.managed_keys().items():
        if _plain(table.get(key)) != want:
            return False
    options = table.get("options")
    if options is None:
        return False
    return all(_plain(options.get(k)) == v for k, v in entry.managed_options().items())


def apply(doc: tomlkit.TOMLDocument, version: int, entry: RuntimeEntry, source: str) -> bool:
    """Register ``entry`` in ``doc`` in place. Returns False (and leaves ``doc`` untouched) if already so.

    An existing ``runtimes.<name>`` table is updated key by key (other keys and comments stay); a
    missing one is added next to its siblings, indented like them.
    """
    if entry_matches(doc, version, entry):
        return False
    existing = find_runtime(doc, version, entry.name)
    if existing is not None:
        if not isinstance(existing, (Table, InlineTable)) and not hasattr(existing, "__setitem__"):
            raise InvalidArgument(
                f"{source}: {table_header(version, entry.name)} is not a table; remove it and run again",
                path=source,
            )
        for key, want in entry.managed_keys().items():
            existing[key] = want
        options = existing.get("options")
        if options is None:
            existing["options"] = entry.managed_options()
        else:
            for key, want in entry.managed_options().items():
                options[key] = want
        return True

    runtimes = _ensure_path(doc, runtimes_path(version), source)
    indent = _child_indent(runtimes)
    if default_runtime_missing(doc, version):
        _append(runtimes, DEFAULT_RUNTIME, _render_table(version, DEFAULT_RUNTIME, _RUNC_KEYS, None, indent))
    if entry.name not in runtimes:
        table = _render_table(version, entry.name, entry.managed_keys(), entry.managed_options(), indent)
        _append(runtimes, entry.name, table)
    return True


def default_runtime_missing(doc: tomlkit.TOMLDocument, version: int) -> bool:
    """True if the file names runtimes but not ``runc`` while ``runc`` is the default runtime.

    containerd 1.6 replaces its built-in runtimes map with the file's as soon as the file has one, and
    then the CRI plugin fails to load ("no corresponding runtime configured in `containerd.runtimes`
    for `containerd` `default_runtime_name = "runc"`" — verified with 1.6.20). So adding a lone
    ``pyvm`` table to a config without runtimes would take CRI down for every pod.
    """
    containerd = _lookup(doc, runtimes_path(version)[:-1])
    if containerd is None:
        return True
    if _plain(containerd.get("default_runtime_name")) not in (None, DEFAULT_RUNTIME):
        return False  # a user-chosen default: theirs to define
    runtimes = containerd.get("runtimes")
    return runtimes is None or DEFAULT_RUNTIME not in runtimes


def remove(doc: tomlkit.TOMLDocument, version: int, name: str = RUNTIME_NAME) -> bool:
    """Delete ``runtimes.<name>`` (with its options) from ``doc``; False if it was not there."""
    parent = _lookup(doc, runtimes_path(version))
    if parent is None or name not in parent:
        return False
    del parent[name]
    return True


def dumps(doc: tomlkit.TOMLDocument) -> str:
    return tomlkit.dumps(doc)


def unified_diff(before: str, after: str, path: str) -> str:
    """A ``diff -u`` style patch from ``before`` to ``after`` for ``path`` ('' if equal)."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{path} (current)" if before else "/dev/null",
            tofile=f"{path} (pyvm)" if after else "/dev/null",
        )
    )


# -- helpers ----------------------------------------------------------------------------------------


def _quote_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


def _parse_reason(exc: tomlkit.exceptions.ParseError) -> str:
    msg = str(exc)
    # tomlkit appends " at line L col C"; we say where ourselves
    cut = msg.rfind(" at line ")
    return msg[:cut] if cut > 0 else msg


def _lookup(doc: tomlkit.TOMLDocument, path: Sequence[str]) -> Any | None:
    """The item at ``path`` (tables walked key by key), or None if a step is missing or not a table."""
    node: Any = doc
    for key in path:
        if not hasattr(node, "get"):
            return None
        node = node.get(key)
        if node is None:
            return None
    return node


def _plain(value: Any) -> Any:
    if value is None:
        return None
    unwrap = getattr(value, "unwrap", None)
    return unwrap() if unwrap else value


def _ensure_path(doc: tomlkit.TOMLDocument, path: Sequence[str], source: str) -> Any:
    """Walk ``path`` from the root, creating missing levels as super tables (no header of their own)."""
    node: Any = doc
    walked: list[str] = []
    for key in path:
        walked.append(key)
        child = node.get(key)
        if child is None:
            child = tomlkit.table(is_super_table=True)
            node[key] = child
            child = node[key]
        elif not hasattr(child, "get") or isinstance(child, InlineTable):
            where = ".".join(_quote_key(k) for k in walked)
            raise InvalidArgument(
                f"{source}: '{where}' is written as a value or inline table; pyvm can only add a table "
                f"below a [table]. Rewrite it as a [{where}] table and run again",
                path=source,
                key=where,
            )
        node = child
    return node


def _child_indent(parent: Any) -> str:
    """Indentation for a table nested in ``parent``: two spaces deeper if the file indents tables."""
    trivia = getattr(parent, "trivia", None)
    indent = trivia.indent.lstrip("\n") if trivia is not None else ""
    siblings = [v for v in getattr(parent, "values", lambda: [])() if isinstance(v, Table)]
    if siblings:
        return siblings[0].trivia.indent.lstrip("\n")
    if indent or isinstance(parent, Container):
        return indent + "  " if indent else ""
    return ""


def _append(runtimes: Any, name: str, table: Table) -> None:
    if isinstance(runtimes, Table):
        # raw_append keeps the indentation we rendered instead of tomlkit's re-indent guess
        runtimes.raw_append(name, table)
    else:
        runtimes[name] = table


def _render_table(
    version: int, name: str, keys: dict[str, Any], options: dict[str, Any] | None, indent: str
) -> Table:
    """A runtime table built from text, so every line carries the file's indentation style."""
    header = table_header(version, name)
    body = indent + ("  " if indent else "")
    lines = [f"{indent}[{header}]"]
    lines += [f"{body}{key} = {tomlkit.item(value).as_string()}" for key, value in keys.items()]
    if options is not None:
        opt_body = body + ("  " if indent else "")
        lines += ["", f"{body}[{header}.options]"]
        lines += [f"{opt_body}{key} = {tomlkit.item(value).as_string()}" for key, value in options.items()]
    node: Any = tomlkit.parse("\n".join(lines) + "\n\n")
    for key in (*runtimes_path(version), name):
        node = node[key]
    return node


__all__ = [
    "POD_ANNOTATIONS",
    "RUNTIME_NAME",
    "RUNTIME_TYPE",
    "SUPPORTED_VERSIONS",
    "RuntimeEntry",
    "apply",
    "default_runtime_missing",
    "dumps",
    "entry_matches",
    "find_runtime",
    "is_blank",
    "new_document",
    "parse",
    "remove",
    "runtimes_path",
    "schema_version",
    "table_header",
    "unified_diff",
]
