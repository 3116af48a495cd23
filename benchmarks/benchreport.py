"""What the benchmark scripts share: the report (rich tables and markdown), logging, percentiles.

Not a benchmark itself; ``bench_*.py`` import it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    env: dict[str, str]
    title: str = "Benchmarks"
    sections: list[Section] = field(default_factory=list)
    verdicts: list[tuple[str, str, str]] = field(default_factory=list)  # target, measured, ok

    def markdown(self) -> str:
        out = [f"# {self.title}, {self.env['date']}", ""]
        out += ["| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.env.items()]
        out.append("")
        out += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
        out += [f"| {t} | {m} | {ok} |" for t, m, ok in self.verdicts]
        out.append("")
        for s in self.sections:
            out += [f"## {s.title}", ""]
            out.append("| " + " | ".join(s.columns) + " |")
            out.append(
                "|" + "|".join("---" if i == 0 else "---:" for i in range(len(s.columns))) + "|"
            )
            out += ["| " + " | ".join(r) + " |" for r in s.rows]
            if s.notes:
                out.append("")
                out += [f"- {n}" for n in s.notes]
            out.append("")
        return "\n".join(out)

    def print(self) -> None:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.markdown())
            return
        console = Console() if Console().is_terminal else Console(width=160)
        env = Table(title="Machine and versions", show_header=False)
        for k, v in self.env.items():
            env.add_row(k, v)
        console.print(env)
        for s in self.sections:
            table = Table(title=s.title, title_justify="left")
            for i, c in enumerate(s.columns):
                table.add_column(c, justify="left" if i == 0 else "right", no_wrap=i == 0)
            for r in s.rows:
                table.add_row(*r)
            console.print(table)
            for n in s.notes:
                console.print(f"  [dim]- {n}[/dim]")
        targets = Table(title="Targets", title_justify="left")
        for c in ("target", "measured", "result"):
            targets.add_column(c)
        for t, m, ok in self.verdicts:
            style = "green" if ok == "MET" else "red" if ok == "MISSED" else "yellow"
            targets.add_row(t, m, f"[{style}]{ok}[/{style}]")
        console.print(targets)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])
