"""Merge the expositions of many shims into one, adding per-sandbox labels to every sample.

Prometheus' text format wants each family's samples together under one ``# HELP``/``# TYPE`` pair,
so samples are grouped by family across sandboxes and written once, in order of first appearance.
A family whose type disagrees with the one seen first (say, shims of two pyvm versions) is dropped
for the later sandbox rather than producing output Prometheus would reject.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from shim.log import get_logger

_log = get_logger("shim.monitor.relabel")

#: families under this prefix belong to the monitor itself; a shim may not provide them
RESERVED_PREFIX = "pyvm_monitor_"


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass
class _Family:
    name: str  # as exposed (counters with _total)
    type: str
    help: str
    lines: list[str] = field(default_factory=list)


class Merger:
    """Accumulates shims' expositions; ``render()`` returns the merged text."""

    def __init__(self, family_prefixes: Sequence[str] = ()) -> None:
        """``family_prefixes``: keep only families whose name starts with one of them (all if empty)."""
        self._families: dict[str, _Family] = {}
        self._prefixes = tuple(family_prefixes)

    def add(self, text: str, labels: Mapping[str, str]) -> int:
        """Parse one shim's exposition and add its samples with ``labels`` set (they win over the
        shim's own labels of the same name). Returns the number of samples added.

        Raises ``ValueError`` if ``text`` is not valid exposition; nothing is added then.
        """
        extra = [f'{k}="{_escape_label(v)}"' for k, v in labels.items()]
        parsed: list[_Family] = []
        try:
            for metric in text_string_to_metric_families(text):
                name = metric.name + "_total" if metric.type == "counter" else metric.name
                if name.startswith(RESERVED_PREFIX) or not metric.samples:
                    continue
                if self._prefixes and not name.startswith(self._prefixes):
                    continue
                typ = "untyped" if metric.type == "unknown" else metric.type
                fam = _Family(name, typ, metric.documentation)
                for s in metric.samples:
                    parts = [f'{k}="{_escape_label(v)}"' for k, v in s.labels.items() if k not in labels]
                    parts += extra
                    label_str = "{" + ",".join(parts) + "}" if parts else ""
                    ts = f" {int(float(s.timestamp) * 1000)}" if s.timestamp is not None else ""
                    fam.lines.append(f"{s.name}{label_str} {format_value(float(s.value))}{ts}\n")
                parsed.append(fam)
        except Exception as exc:  # the parser raises ValueError, IndexError, ...: all mean "bad input"
            raise ValueError(f"invalid exposition: {exc!r}") from exc
        added = 0
        for fam in parsed:
            have = self._families.get(fam.name)
            if have is None:
                self._families[fam.name] = fam
            elif have.type != fam.type:
                _log.warning(
                    "metric family type conflict, dropped", family=fam.name, type=fam.type, first=have.type
                )
                continue
            else:
                have.lines.extend(fam.lines)
            added += len(fam.lines)
        return added

    def render(self) -> bytes:
        out: list[str] = []
        for fam in self._families.values():
            out.append(f"# HELP {fam.name} {_escape_help(fam.help)}\n")
            out.append(f"# TYPE {fam.name} {fam.type}\n")
            out.extend(fam.lines)
        return "".join(out).encode("utf-8")


__all__ = ["RESERVED_PREFIX", "Merger", "format_value"]
