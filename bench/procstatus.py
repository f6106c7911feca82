"""Memory figures of a live process from ``/proc/PID/status`` (Linux), for the benchmarks."""

from __future__ import annotations

from pathlib import Path


def proc_status(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """``keys`` (e.g. "VmHWM", "VmRSS", "RssAnon") of process ``pid`` in bytes; empty once
    the process has exited."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out
