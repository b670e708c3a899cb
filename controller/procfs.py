"""Reading Linux /proc for the local executor: which processes belong to a runner's session,
how much memory they use, and whether a pid still names the process we started.

A runner is started in a new session (its pid is the session id), so FFmpeg and anything
else it spawns are found by session id, even after being reparented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    #: R, S, D, Z, ... (proc(5)); a zombie has exited and holds no memory.
    state: str
    session: int
    #: Clock ticks after boot: with the pid, identifies one process across pid reuse.
    start_time: int
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat (None if the process is gone)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    rest = text[text.rindex(")") + 2 :].split()
    # Fields from "state" (field 3 in proc(5)) on: session=6, starttime=22, rss=24.
    return ProcStat(pid, rest[0], int(rest[3]), int(rest[19]), int(rest[21]) * PAGE_SIZE)


def session_rss(sessions: set[int]) -> dict[int, int]:
    """Total resident memory of every process in each of `sessions` (one /proc scan)."""
    totals = dict.fromkeys(sessions, 0)
    if not sessions:
        return totals
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = read_stat(int(entry.name))
        if stat is not None and stat.session in totals:
            totals[stat.session] += stat.rss_bytes
    return totals


def is_same_process(pid: int, start_time: int) -> bool:
    """Is `pid` still the process that started at `start_time` (not a reused pid)?"""
    stat = read_stat(pid)
    return stat is not None and stat.start_time == start_time and stat.state != "Z"


def find_session_leader(variable: str, value: str) -> ProcStat | None:
    """The live session leader whose environment has `variable=value`, if any.

    How the local executor finds a runner whose pid it never wrote down (the controller died
    between starting it and writing its pid file): each attempt's runner gets a unique
    SCRATCH_DIR and leads its own session; its FFmpeg children inherit the environment but
    are not session leaders."""
    needle = f"{variable}={value}".encode()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle not in environ.split(b"\0"):
            continue
        stat = read_stat(int(entry.name))
        if stat is not None and stat.session == stat.pid and stat.state != "Z":
            return stat
    return None
