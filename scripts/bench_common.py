"""What every benchmark script shares: machine facts, memory of the process, Markdown tables, and writing its
own section of docs/benchmarks.md without touching the others'."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from specprune_cli.latency import MALLOC_ENV, keep_memory_mapped

HEADER = ("# Benchmarks\n\nEvery table below is written by the script named in its heading; nothing is typed "
          "by hand. Re-run a script to refresh its section (`pip install -e '.[bench]'` first).\n")


def keep_freed_memory_mapped() -> bool:
    """``latency.keep_memory_mapped`` in this process, and its settings in the environment of the
    processes it starts, so a timed loop does not pay page faults to map again what its previous round
    freed. Call it first in a benchmark's main. Returns False where the C library is not glibc."""
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)
    return keep_memory_mapped()


def memory_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str, after: str | None = None) -> None:
    """Put ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``; other sections
    stay as they are. When the section is absent it goes right after section ``after`` (when given and
    present), else at the end (creating the file). Written to a temporary name, then renamed."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{text.rstrip()}\n{end}"
    anchor = f"<!-- {after}:end -->"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    elif after is not None and anchor in current:
        head, rest = current.split(anchor, 1)
        new = head + anchor + "\n\n" + block + rest
    else:
        new = current.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new)
    tmp.replace(path)
