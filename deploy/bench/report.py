"""What a benchmark run found: quantities as min/median/max over repeats, printed as
tables and written as one JSON document (the figures in docs/benchmarks.md come from it)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ModstreamError

FORMAT_VERSION = 1


class BenchError(ModstreamError):
    """A suite cannot run as asked: a bad option or a missing prerequisite."""


@dataclass(frozen=True)
class Measure:
    """One quantity over repeats. Tables show ``median (min-max)``: the spread says how far
    to trust the median on a shared machine."""

    samples: tuple[float, ...]
    unit: str = ""

    @classmethod
    def of(cls, samples: Iterable[float], unit: str = "") -> Measure:
        values = tuple(float(value) for value in samples)
        if not values:
            raise BenchError("a measure needs at least one sample")
        return cls(values, unit)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "unit": self.unit,
                "samples": list(self.samples)}


def ratios(numerators: Measure, denominators: Measure, unit: str = "x") -> Measure:
    """Repeat-by-repeat ratios: each pair was measured moments apart, so a slow spell on the
    machine moves both sides and cancels out."""
    return Measure.of((n / d if d else float("inf") for n, d in
                       zip(numerators.samples, denominators.samples, strict=True)), unit)


@dataclass(frozen=True)
class Goal:
    """A target the suite is held to and whether this run met it; met is None where the run was not
    the one the goal is stated for (another size, no GPU), and note says why."""

    name: str
    measured: str
    met: bool | None
    note: str = ""

    @property
    def status(self) -> str:
        return {True: "met", False: "NOT MET", None: "n/a"}[self.met]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "status": self.status, "note": self.note}


@dataclass
class Table:
    """Rows of cells under fixed columns; a cell is a Measure, a number, a bool or text."""

    title: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **cells: Any) -> None:
        unknown = set(cells) - set(self.columns)
        if unknown:
            raise BenchError(f"table {self.title!r} has no columns {sorted(unknown)}")
        self.rows.append(cells)

    def render(self) -> str:
        cells = [[format_value(row.get(column)) for column in self.columns] for row in self.rows]
        widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(self.columns)]
        lines = [self.title,
                 "  ".join(column.ljust(width) for column, width in zip(self.columns, widths, strict=True)),
                 "  ".join("-" * width for width in widths)]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns),
                "rows": [{key: _json_value(value) for key, value in row.items()} for row in self.rows]}


@dataclass
class SuiteResult:
    """One suite's tables, goals and notes, and the parameters that produced them."""

    suite: str
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self, title: str, columns: Sequence[str]) -> Table:
        table = Table(title, tuple(columns))
        self.tables.append(table)
        return table

    def render(self) -> str:
        parts = [f"== {self.suite} ({self.seconds:.0f} s) " + " ".join(f"{k}={v}" for k, v in self.params.items())]
        parts += [table.render() for table in self.tables]
        if self.goals:
            parts.append("goals\n" + "\n".join(
                f"  [{goal.status}] {goal.name}: {goal.measured}" + (f" ({goal.note})" if goal.note else "")
                for goal in self.goals))
        if self.notes:
            parts.append("notes\n" + "\n".join(f"  - {note}" for note in self.notes))
        return "\n\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "seconds": self.seconds, "params": _json_value(self.params),
                "tables": [table.to_dict() for table in self.tables],
                "goals": [goal.to_dict() for goal in self.goals], "notes": self.notes}


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Measure):
        if len(value.samples) == 1 or value.min == value.max:
            return _number(value.median)
        return f"{_number(value.median)} ({_number(value.min)}-{_number(value.max)})"
    if isinstance(value, float):
        return _number(value)
    return str(value)


def _number(value: float) -> str:
    """About four significant digits without exponents, which read badly in a table."""
    magnitude = abs(value)
    if magnitude == float("inf"):
        return "inf"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _json_value(value: Any) -> Any:
    """Plain JSON: measures as dicts, and no Infinity or NaN, which strict parsers reject."""
    if isinstance(value, Measure):
        return _json_value(value.to_dict())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value


def machine_info() -> dict[str, Any]:
    """Enough to tell whether two runs are comparable: CPU, cores this process may use,
    memory and the load when the run began."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = os.getloadavg()[0]
    return info


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: str | Path, results: Sequence[SuiteResult], options: dict[str, Any],
               machine: dict[str, Any]) -> None:
    document = {"format": FORMAT_VERSION, "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
                "options": _json_value(options), "machine": machine,
                "suites": [result.to_dict() for result in results]}
    Path(path).write_text(json.dumps(document, indent=2) + "\n")
