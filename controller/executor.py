"""The small interface between the service loop and whatever runs attempts.

Two implementations: `controller.kube.KubernetesExecutor` (one batch/v1 Job per attempt) and
`controller.local.LocalExecutor` (one subprocess per attempt). The loop never learns which:
it launches, observes, and deletes runners by `RunnerKey`, and decides with the pure rules in
controller/reconcile.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from controller.jobspec import Instance, LaunchSpec
from controller.model import Observation, RunnerKey


@dataclass(frozen=True)
class Launched:
    """The result of launching one attempt: its runner's name, or why it did not start.

    `invalid` means the request itself was rejected (a bad spec, a forbidden namespace) and
    repeating it cannot help; `foreign` means a runner with this attempt's name exists but
    is not this attempt's (its labels differ), so the attempt fails at once (retried: the next
    attempt has another name); other errors are retried until PENDING_TIMEOUT_SECONDS.
    """

    key: RunnerKey
    runner_name: str | None
    error: str | None = None
    invalid: bool = False
    foreign: bool = False


class Executor(Protocol):
    #: "kubernetes" or "local", for logs and metrics.
    kind: str
    #: Rows this executor can see runners for: None = every processing row (Kubernetes, the
    #: leader adopts all), else the `claimed_by` identity (local: only its own children).
    owner: str | None

    def bind(self, instance: Instance) -> None:
        """The installation this controller serves (read from the database before `start`):
        only its runners are observed, adopted and deleted."""

    def start(self, wake: Callable[[], None]) -> None:
        """Begin observing; call `wake()` whenever something changed."""

    def synced(self) -> bool:
        """True once the executor's view is complete (a watch cache has listed)."""

    def problems(self) -> list[str]:
        """Why the executor's view is no longer maintained (a background thread died); the
        probes fail with these reasons."""

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        """Start these attempts (idempotent per key)."""

    def observe(self, key: RunnerKey) -> Observation:
        """What is known about the runner of `key` (Phase.NONE if nothing)."""

    def verify_gone(self, key: RunnerKey, runner_name: str) -> Observation:
        """Ask the source of truth about a recorded runner that `observe` does not see:
        Phase.DELETED if it is really gone, else what it is."""

    def alive(self) -> list[RunnerKey]:
        """Runners that have not finished (the loop stops those whose row moved on)."""

    def finished_unclaimed(self) -> list[RunnerKey]:
        """Finished runners the executor still keeps state for (released via `forget`)."""

    def delete(self, key: RunnerKey) -> None:
        """Stop and remove the runner of `key` (cancellation, stale attempt, stuck Pending)."""

    def forget(self, key: RunnerKey) -> None:
        """The outcome of `key` is recorded (or irrelevant): release local state."""

    def shutdown(self) -> None:
        """Stop observing. Kubernetes leaves Jobs running; local stops its processes."""
