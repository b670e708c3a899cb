"""The local test control plane (`scripts/testbed`) shared by test sessions and benchmarks.

Why here and not in `scripts/testbed`: kwokctl runs the cluster, and what is left to decide
is about Python processes. A pytest session (tests/testbed.py) or a benchmark
(bench/harness.py) that had to start the testbed stops it when it ends, unless a person
started it by hand (they want it), another session still uses it, or
`DHARMA_TESTBED_KEEP=1`. Each session is a file named by its process id; a dead process's
file no longer counts, so a killed session never keeps the testbed up forever. One lock
file orders every `up` and `release`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devtools.cache import cache_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "testbed"
#: Marks a testbed a session started, so the last session may stop it. `scripts/testbed up`
#: run by hand (without DHARMA_TESTBED_SESSION) removes it: a person wants the testbed.
AUTO_DOWN = "auto-down"

Runner = Callable[[Sequence[str]], str]


def cache_root() -> Path:
    """`scripts/testbed`'s cache and state directory (its CACHE_ROOT)."""
    return cache_dir() / "testbed"


def run_script(args: Sequence[str]) -> str:
    """Run `scripts/testbed` on behalf of this process; its progress goes to stderr (the
    terminal), its stdout is returned. The session id tells `up` a test session asked."""
    done = subprocess.run(
        [str(SCRIPT), *args],
        check=True,
        text=True,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "DHARMA_TESTBED_SESSION": str(os.getpid())},
    )
    return done.stdout


@dataclass
class Sessions:
    """The sessions using the testbed under `root`; `run` runs `scripts/testbed` (a
    recording fake in the unit tests) and `pid` names this session."""

    root: Path = field(default_factory=cache_root)
    run: Runner = run_script
    pid: int = field(default_factory=os.getpid)

    @property
    def directory(self) -> Path:
        return self.root / "sessions"

    def up(self) -> Path:
        """Bring the testbed up (or find it up) for this session; its kubeconfig path."""
        with self._locked():
            was_up = (self.root / "run" / "key").exists()
            out = self.run(["up"])
            self.directory.mkdir(parents=True, exist_ok=True)
            if not was_up:
                (self.directory / AUTO_DOWN).touch()
            (self.directory / str(self.pid)).touch()
        return Path(out.strip().rpartition("=")[2])

    def release(self, keep: bool = False) -> str:
        """This session is done: stop the testbed if a session started it and no live one
        is left (and neither `keep` nor DHARMA_TESTBED_KEEP=1 says otherwise). Returns what
        was done, for the session's output."""
        keep = keep or os.environ.get("DHARMA_TESTBED_KEEP") == "1"
        with self._locked():
            (self.directory / str(self.pid)).unlink(missing_ok=True)
            others = self.live()
            if not (self.directory / AUTO_DOWN).exists():
                return "left running (started by hand)"
            if others:
                return f"left running ({len(others)} other test session(s) use it)"
            if keep:
                return "left running (DHARMA_TESTBED_KEEP=1)"
            self.run(["down"])
            (self.directory / AUTO_DOWN).unlink(missing_ok=True)
            return "stopped; state removed"

    def live(self) -> list[int]:
        """Process ids of the sessions still running; files of dead ones are removed."""
        alive = []
        for path in sorted(self.directory.glob("[0-9]*")):
            if Path(f"/proc/{path.name}").exists():
                alive.append(int(path.name))
            else:
                path.unlink(missing_ok=True)
        return alive

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The sessions lock: outside the sessions directory, which `down` deletes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "sessions.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
