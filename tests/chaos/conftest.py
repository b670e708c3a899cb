"""Options and reporting for the fault-injection suite (tests/chaos).

Why a command-line option: CI runs each scenario with a small fault budget so the whole file
stays within minutes; an operator who wants more confidence runs the same scenarios for
longer (`--chaos-seconds 600`) or replays a failing run (`--chaos-seed N`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

#: Result tables of this session's scenarios, printed in the terminal summary so that they
#: are shown even when the test passes and output capture (`-s` absent) hid its prints.
TABLES: list[str] = []


@dataclass(frozen=True)
class ChaosRun:
    """One scenario's budget and its seeded randomness (the seed is printed for replay)."""

    seed: int
    rng: random.Random
    seconds: float


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> ChaosRun:
    seed: int | None = request.config.getoption("--chaos-seed")
    if seed is None:
        seed = time.time_ns() % 1_000_000_007
    print(f"chaos seed: {seed} (replay with --chaos-seed {seed})")
    request.node.user_properties.append(("chaos_seed", seed))
    seconds: float = request.config.getoption("--chaos-seconds")
    return ChaosRun(seed, random.Random(seed), seconds)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A per-test timeout that grows with the budget: faults, then up to ~8 min of bounded
    settling; it only bounds a hung run and is never an assertion about speed."""
    seconds: float = config.getoption("--chaos-seconds")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(pytest.mark.timeout(int(900 + 2 * seconds)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TABLES:
        terminalreporter.section("chaos results")
        for table in TABLES:
            terminalreporter.write_line(table)
