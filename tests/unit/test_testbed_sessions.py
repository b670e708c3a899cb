"""Who may stop the shared testbed (devtools/testbed.py `Sessions`).

`scripts/testbed` itself is replaced by a recording fake that does what the script does to
the state directory (`up` creates run/key and, run by hand, removes the auto-down mark;
`down` removes run/ and sessions/): starting real clusters is the e2e suites' business.
Other sessions are real processes (alive: a sleeping child; dead: one that has exited).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from devtools.testbed import AUTO_DOWN, Sessions


class FakeScript:
    """Records the commands and applies their effect on the state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(" ".join(args))
        if args[0] == "up":
            (self.root / "run").mkdir(parents=True, exist_ok=True)
            (self.root / "run" / "key").touch()
            return f"export KUBECONFIG={self.root}/run/kubeconfig\n"
        if args[0] == "down":
            shutil.rmtree(self.root / "run", ignore_errors=True)
            shutil.rmtree(self.root / "sessions", ignore_errors=True)
        return ""

    def up_by_hand(self) -> None:
        """`scripts/testbed up` without DHARMA_TESTBED_SESSION."""
        self(["up"])
        (self.root / "sessions" / AUTO_DOWN).unlink(missing_ok=True)


@pytest.fixture
def script(tmp_path: Path) -> FakeScript:
    return FakeScript(tmp_path)


@pytest.fixture
def other_pid() -> Iterator[int]:
    """A live process standing for another test session."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        yield proc.pid
        proc.kill()


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_a_session_that_started_the_testbed_stops_it(script: FakeScript) -> None:
    sessions = Sessions(root=script.root, run=script, pid=101)
    assert sessions.up() == script.root / "run" / "kubeconfig"
    assert sessions.release() == "stopped; state removed"
    assert script.calls == ["up", "down"]


def test_a_testbed_started_by_hand_is_left_running(script: FakeScript) -> None:
    script.up_by_hand()
    sessions = Sessions(root=script.root, run=script, pid=101)
    sessions.up()
    assert sessions.release() == "left running (started by hand)"
    assert "down" not in script.calls


def test_up_by_hand_while_a_session_runs_keeps_it_after_the_session(script: FakeScript) -> None:
    sessions = Sessions(root=script.root, run=script, pid=101)
    sessions.up()
    script.up_by_hand()
    assert sessions.release() == "left running (started by hand)"


def test_the_last_live_session_stops_it_and_dead_ones_do_not_count(
    script: FakeScript, other_pid: int
) -> None:
    first = Sessions(root=script.root, run=script, pid=other_pid)
    first.up()
    crashed = Sessions(root=script.root, run=script, pid=dead_pid())
    crashed.up()
    ours = Sessions(root=script.root, run=script, pid=101)
    ours.up()
    assert ours.release() == "left running (1 other test session(s) use it)"
    assert first.live() == [other_pid]  # the crashed session's file is gone
    assert first.release() == "stopped; state removed"
    assert script.calls == ["up", "up", "up", "down"]


def test_keep_leaves_it_running(script: FakeScript, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = Sessions(root=script.root, run=script, pid=101)
    sessions.up()
    assert sessions.release(keep=True) == "left running (DHARMA_TESTBED_KEEP=1)"
    monkeypatch.setenv("DHARMA_TESTBED_KEEP", "1")
    assert sessions.release() == "left running (DHARMA_TESTBED_KEEP=1)"
    monkeypatch.delenv("DHARMA_TESTBED_KEEP")
    assert sessions.release() == "stopped; state removed"
