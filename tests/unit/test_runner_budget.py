"""Fast tests of the per-attempt transcription budget (issue 12, item 2): its size, the
clock whisper's abort callback polls, the permanent error it ends in, and its settings."""

from __future__ import annotations

import pytest

from dharma_common.contract import ExitCode
from dharma_common.settings import ConfigError, load_settings
from jobrunner.settings import RunnerSettings
from jobrunner.transcribe import BOUNDED, WHISPER_DEFAULTS, Budget, BudgetClock, Decoding


def test_budget_is_a_floor_plus_a_multiple_of_the_audio() -> None:
    budget = Budget(factor=1.5, floor=60)
    assert budget.seconds(0) == 60
    assert budget.seconds(3600) == 60 + 5400
    assert Budget().seconds(3 * 3600) < 4 * 3600  # defaults: a 3-hour talk, inside 4 h


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_clock_trips_after_the_budget_and_stays_tripped() -> None:
    clock = FakeClock()
    over = BudgetClock(30.0, clock)
    assert not over() and not over.tripped
    clock.now += 30.0
    assert not over()  # exactly at the budget: still allowed
    clock.now += 0.01
    assert over() and over.tripped
    clock.now -= 100  # a clock cannot untrip it
    assert over()


def test_no_budget_never_trips() -> None:
    clock = FakeClock()
    over = BudgetClock(None, clock)
    clock.now += 10**9
    assert not over() and not over.tripped


def test_exceeding_it_is_permanent_and_names_the_numbers_and_settings() -> None:
    error = Budget(factor=0.5, floor=10).exceeded(Budget(0.5, 10).seconds(81.3), 81.3)
    assert error.exit_code == ExitCode.PERMANENT
    message = str(error)
    assert message.startswith("transcription exceeded its budget of 51 s for 81 s of audio")
    assert "TRANSCRIBE_BUDGET_FACTOR=0.5" in message
    assert "TRANSCRIBE_BUDGET_FLOOR_SECONDS=10" in message


def test_settings_default_and_refuse_a_zero_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBDAV_BASE_URL", "http://dav.example.org")
    monkeypatch.setenv("DB_HOST", "localhost")
    monkeypatch.setenv("DB_USER", "runner")
    for name in ("TRANSCRIBE_BUDGET_FACTOR", "TRANSCRIBE_BUDGET_FLOOR_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(RunnerSettings)
    assert (settings.TRANSCRIBE_BUDGET_FACTOR, settings.TRANSCRIBE_BUDGET_FLOOR_SECONDS) == (
        1.0,
        120.0,
    )
    monkeypatch.setenv("TRANSCRIBE_BUDGET_FACTOR", "0")
    with pytest.raises(ConfigError, match="TRANSCRIBE_BUDGET_FACTOR"):
        load_settings(RunnerSettings)


def test_decoding_reaches_whisper_under_the_bindings_names() -> None:
    """The names are pywhispercpp 1.5.1's (PARAMS_SCHEMA), which it sets as attributes of
    whisper_full_params; best_of sits in the `greedy` struct (the fallback's candidates)."""
    from pywhispercpp.constants import PARAMS_SCHEMA

    params = BOUNDED.params()
    assert set(params) <= set(PARAMS_SCHEMA)
    assert Decoding() == WHISPER_DEFAULTS  # "before" is whisper.cpp's own defaults
    assert WHISPER_DEFAULTS.params()["greedy"] == {"best_of": 5}
