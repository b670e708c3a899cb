"""The queue side against a real PostgreSQL: the batch claim (cap, order, SKIP LOCKED,
concurrent claimers), fenced writes, and the LISTEN/NOTIFY wake-up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from controller.migrate import available_migrations
from controller.model import RunnerKey
from controller.reconcile import Failure, FailureReason, GiveUp, Retry, plan_failure
from controller.settings import ControllerSettings
from controller.store import Store
from devtools.controller_helpers import ControllerProcess, eventually
from devtools.services import Database
from tests.conftest import Queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SETTINGS = ControllerSettings(DB_HOST="db", DB_USER="u", RETRY_BASE_SECONDS=30)


def media(queue: Queue) -> Any:
    with queue.conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (category_id, source_path)"
            " VALUES ('talks', '/uploads/x.mp4') RETURNING id"
        )
        return cur.fetchone()[0]


def enqueue(queue: Queue, count: int, media_id: Any = None, **columns: Any) -> list[int]:
    """`count` pending rows, each for its own new media (as uploads make them), or all for
    `media_id` (one media's jobs run one at a time, issue 10 defect 11)."""
    names = ", ".join(["media_id", *columns])
    marks = ", ".join(["%s"] * (1 + len(columns)))
    ids = []
    for _ in range(count):
        with queue.conn.cursor() as cur:
            media_id_of_row = media(queue) if media_id is None else media_id
            cur.execute(
                f"INSERT INTO dharma.stt_jobs ({names}) VALUES ({marks}) RETURNING id",
                (media_id_of_row, *columns.values()),
            )
            ids.append(cur.fetchone()[0])
    return ids


def claim_in_parallel(db: Database, count: int, claim: Callable[[int, Store], None]) -> None:
    """Run `claim(index, store)` on `count` threads, each with its own Store (connection),
    released together by a barrier so their claims race."""
    barrier = threading.Barrier(count)

    def claimer(index: int) -> None:
        store = Store(db.settings, f"claimer-{index}")
        barrier.wait()
        try:
            claim(index, store)
        finally:
            store.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def test_claim_sets_the_attempt_and_respects_the_cap(db: Database, queue: Queue) -> None:
    ids = enqueue(queue, 6)
    store = Store(db.settings, "test")
    claimed = store.claim("replica-a", batch=50, max_in_flight=4)
    assert sorted(r.id for r in claimed) == ids[:4]  # oldest first
    row = queue.row(
        "SELECT status, attempts, claimed_by, processing_started_at IS NOT NULL, runner_name"
        " FROM dharma.stt_jobs WHERE id = %s",
        ids[0],
    )
    assert row == ("processing", 1, "replica-a", True, None)
    assert store.claim("replica-a", batch=50, max_in_flight=4) == []
    store.close()


def test_claim_order_priority_and_run_after(db: Database, queue: Queue) -> None:
    low = enqueue(queue, 1)
    high = enqueue(queue, 1, priority=5)
    later = enqueue(queue, 1, priority=9)
    queue.row(
        "UPDATE dharma.stt_jobs SET run_after = now() + interval '1 hour' WHERE id = %s"
        " RETURNING id",
        later[0],
    )
    store = Store(db.settings, "test")
    first = store.claim("a", batch=1, max_in_flight=10)
    second = store.claim("a", batch=1, max_in_flight=10)
    assert [first[0].id, second[0].id] == [high[0], low[0]]
    assert store.claim("a", batch=10, max_in_flight=10) == []  # not yet due
    store.close()


def test_claim_skips_locked_rows(db: Database, queue: Queue) -> None:
    """A row locked by another transaction (say, an admin's UPDATE in progress) is skipped,
    not waited for."""
    ids = enqueue(queue, 3)
    holder = db.connect()
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT id FROM dharma.stt_jobs WHERE id = %s FOR UPDATE", (ids[0],))
    store = Store(db.settings, "test")
    result: list[list[int]] = []
    claimer = threading.Thread(
        target=lambda: result.append([r.id for r in store.claim("a", 10, 10)])
    )
    claimer.start()
    claimer.join(timeout=30)
    holder.rollback()
    holder.close()
    assert not claimer.is_alive(), "the claim blocked on a locked row"
    assert sorted(result[0]) == ids[1:]
    store.close()


def test_concurrent_claimers_never_share_a_row_nor_exceed_the_cap(
    db: Database, queue: Queue
) -> None:
    """Four claimers in parallel, batch 7, cap 25 over 60 rows: each row is claimed once and
    no more than 25 are ever processing (the advisory lock makes the count exact)."""
    enqueue(queue, 60)
    claims: list[list[int]] = [[] for _ in range(4)]

    def claim(index: int, store: Store) -> None:
        while rows := store.claim(f"c{index}", batch=7, max_in_flight=25):
            claims[index].extend(r.id for r in rows)

    claim_in_parallel(db, 4, claim)
    everything = [job for claimed in claims for job in claimed]
    assert len(everything) == len(set(everything)) == 25
    assert queue.row("SELECT count(*) FROM dharma.stt_jobs WHERE status = 'processing'")[0] == 25


def test_one_run_per_media_the_oldest_first_others_not_held_up(db: Database, queue: Queue) -> None:
    """Issue 10, defect 11: two jobs of one media never run at once (their WebDAV files and
    subtitles would mix). Both rows stay enqueued; the younger waits until the older is
    final, even with a higher priority, while other media's rows are claimed as usual."""
    talk = media(queue)
    first, second = enqueue(queue, 2, media_id=talk)
    queue.row("UPDATE dharma.stt_jobs SET priority = 9 WHERE id = %s RETURNING id", second)
    (other,) = enqueue(queue, 1)
    store = Store(db.settings, "test")
    claimed = store.claim("a", batch=10, max_in_flight=10)
    assert sorted(r.id for r in claimed) == [first, other]
    assert store.claim("a", batch=10, max_in_flight=10) == []
    assert store.next_due() is None  # the held row is not "due": the loop must not spin
    (later,) = enqueue(queue, 1)  # a new media arriving meanwhile is not held up
    assert [r.id for r in store.claim("a", batch=10, max_in_flight=10)] == [later]
    assert store.record_failure(RunnerKey(first, 1), FailureReason.RUNNER_PERMANENT, "bad media")
    assert [r.id for r in store.claim("a", batch=10, max_in_flight=10)] == [second]
    assert queue.rows(
        "SELECT id, status FROM dharma.stt_jobs WHERE media_id = %s ORDER BY id", talk
    ) == [(first, "failed"), (second, "processing")]
    store.close()


def test_a_media_waits_for_its_older_row_even_while_that_one_backs_off(
    db: Database, queue: Queue
) -> None:
    """A younger row does not overtake an older row of its media waiting for a retry: the
    media's jobs finish in insertion order, so the last request's result is the one kept."""
    talk = media(queue)
    first, _ = enqueue(queue, 2, media_id=talk)
    queue.row(
        "UPDATE dharma.stt_jobs SET run_after = now() + interval '1 hour' WHERE id = %s"
        " RETURNING id",
        first,
    )
    store = Store(db.settings, "test")
    assert store.claim("a", batch=10, max_in_flight=10) == []
    next_due = store.next_due()
    assert next_due is not None and 3500 < next_due <= 3600  # the older row's retry
    queue.row("UPDATE dharma.stt_jobs SET run_after = now() WHERE id = %s RETURNING id", first)
    assert [r.id for r in store.claim("a", batch=10, max_in_flight=10)] == [first]
    store.close()


def test_concurrent_claimers_never_run_one_media_twice(db: Database, queue: Queue) -> None:
    """Four claimers in parallel over 5 media with 4 rows each: one row per media runs."""
    talks = [media(queue) for _ in range(5)]
    for talk in talks:
        enqueue(queue, 4, media_id=talk)

    def claim(index: int, store: Store) -> None:
        for _ in range(5):
            store.claim(f"c{index}", batch=3, max_in_flight=50)

    claim_in_parallel(db, 4, claim)
    running = queue.rows(
        "SELECT media_id, min(id), count(*) FROM dharma.stt_jobs WHERE status = 'processing'"
        " GROUP BY media_id"
    )
    oldest = queue.rows("SELECT media_id, min(id) FROM dharma.stt_jobs GROUP BY media_id")
    assert sorted(running) == sorted((m, first, 1) for m, first in oldest)


def test_status_writes_are_fenced(db: Database, queue: Queue) -> None:
    """An outcome for attempt 1 changes nothing once the row is at attempt 2 or cancelled."""
    (job_id,) = enqueue(queue, 1)
    store = Store(db.settings, "test")
    store.claim("a", 1, 10)
    queue.row("UPDATE dharma.stt_jobs SET status = 'pending' WHERE id = %s RETURNING id", job_id)
    store.claim("a", 1, 10)  # attempt 2
    assert not store.record_success(RunnerKey(job_id, 1))
    assert not store.record_failure(RunnerKey(job_id, 1), FailureReason.OOM_KILLED, "x")
    queue.row("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s RETURNING id", job_id)
    assert not store.record_success(RunnerKey(job_id, 2))
    assert not store.record_retry(
        RunnerKey(job_id, 2), FailureReason.RUNNER_TEMPORARY, "m", 1.0, None
    )
    assert queue.row("SELECT status FROM dharma.stt_jobs WHERE id = %s", job_id)[0] == "cancelled"
    store.close()


def test_a_requeued_failed_row_gets_a_fresh_budget_and_stays_fenced(
    db: Database, queue: Queue
) -> None:
    """Issue item 12: an operator's plain `SET status = 'pending'` on a row that failed after
    max_attempts gives it max_attempts more attempts, while attempts keeps counting up so
    the old attempts' runners stay fenced."""
    (job_id,) = enqueue(queue, 1, max_attempts=2)
    store = Store(db.settings, "test")
    failure = Failure(FailureReason.RUNNER_TEMPORARY, "WebDAV 503", True)
    for attempt in (1, 2):
        (claimed,) = store.claim("a", 1, 10)
        assert claimed.attempts == attempt
        plan = plan_failure(claimed, failure, SETTINGS, jitter=0.0)
        if isinstance(plan, Retry):
            assert store.record_retry(claimed.key, plan.reason, plan.message, 0.0, None)
        else:
            assert store.record_failure(claimed.key, plan.reason, plan.message)
    assert queue.row("SELECT status FROM dharma.stt_jobs WHERE id = %s", job_id)[0] == "failed"

    queue.row("UPDATE dharma.stt_jobs SET status = 'pending' WHERE id = %s RETURNING id", job_id)
    assert queue.row(
        "SELECT error_message, failure_reason FROM dharma.stt_jobs WHERE id = %s", job_id
    ) == (None, None)  # the old verdict is not shown on a job that waits again
    for attempt, plan_type in ((3, Retry), (4, GiveUp)):
        (claimed,) = store.claim("a", 1, 10)
        assert claimed.attempts == attempt  # monotonic: never reused after the re-queue
        plan = plan_failure(claimed, failure, SETTINGS, jitter=0.0)
        assert isinstance(plan, plan_type), plan
        assert f"(attempt {attempt - 2} of 2;" in plan.message
        # The runners of the attempts before the re-queue stay fenced.
        for stale in (1, 2):
            assert not store.set_runner_name(RunnerKey(job_id, stale), "stale")
            assert not store.record_success(RunnerKey(job_id, stale))
            assert not store.record_failure(RunnerKey(job_id, stale), failure.reason, "m")
            assert not store.record_retry(RunnerKey(job_id, stale), failure.reason, "m", 0.0, None)
        if isinstance(plan, Retry):
            assert store.record_retry(claimed.key, plan.reason, plan.message, 0.0, None)
        else:
            assert store.record_failure(claimed.key, plan.reason, plan.message)
    assert queue.row("SELECT status, attempts FROM dharma.stt_jobs WHERE id = %s", job_id) == (
        "failed",
        4,
    )
    store.close()


@pytest.mark.parametrize("final", ["failed", "cancelled", "completed"])
def test_requeue_from_any_final_status_starts_a_budget(
    db: Database, queue: Queue, final: str
) -> None:
    """Also after migration 0003 is applied a second time (idempotent like the others)."""
    (migration,) = [m for m in available_migrations() if m.version == 3]
    queue.row(migration.sql + "; SELECT 1")
    (job_id,) = enqueue(queue, 1)
    store = Store(db.settings, "test")
    (claimed,) = store.claim("a", 1, 10)
    queue.row(
        "UPDATE dharma.stt_jobs SET status = %s, error_message = 'e', failure_reason = 'r'"
        " WHERE id = %s RETURNING id",
        final,
        job_id,
    )
    queue.row(
        "UPDATE dharma.stt_jobs SET status = 'pending', error_message = 'kept'"
        " WHERE id = %s RETURNING id",
        job_id,
    )
    assert queue.row(
        "SELECT attempts_base, error_message, failure_reason FROM dharma.stt_jobs WHERE id = %s",
        job_id,
    ) == (1, "kept", None)  # what the operator's UPDATE sets itself is kept
    (again,) = store.claim("a", 1, 10)
    assert (again.attempts, again.attempt_number) == (2, 1)
    assert not store.record_success(claimed.key)
    store.close()


def test_a_reset_of_a_processing_row_keeps_its_budget(db: Database, queue: Queue) -> None:
    """Only a terminal row re-queued starts a fresh budget: a stuck `processing` row set back
    to pending continues where it was, or resets could retry a job forever."""
    (job_id,) = enqueue(queue, 1, max_attempts=2)
    store = Store(db.settings, "test")
    store.claim("a", 1, 10)
    queue.row("UPDATE dharma.stt_jobs SET status = 'pending' WHERE id = %s RETURNING id", job_id)
    (claimed,) = store.claim("a", 1, 10)
    assert (claimed.attempts, claimed.attempts_base) == (2, 0)
    failure = Failure(FailureReason.RUNNER_TEMPORARY, "WebDAV 503", True)
    assert isinstance(plan_failure(claimed, failure, SETTINGS, jitter=0.0), GiveUp)
    store.close()


def test_notify_wakes_the_controller_before_the_poll_would(
    queue: Queue,
    controller_env: dict[str, str],
    start_controller: Callable[..., ControllerProcess],
) -> None:
    """With a 10-minute poll interval, a row inserted after the controller went idle is
    claimed anyway: only the NOTIFY from the insert trigger can have woken it (this test's
    wait is bounded far below the poll interval)."""
    env = {**controller_env, "POLL_INTERVAL_SECONDS": "600"}
    controller = start_controller(env)
    eventually(lambda: controller.events("listening"), "LISTEN", timeout=60)
    eventually(lambda: controller.events("controller_starting"), "start")
    job_id = queue.enqueue(queue.add_media("garbage"))
    eventually(
        lambda: (
            queue.row("SELECT status FROM dharma.stt_jobs WHERE id = %s", job_id)[0] == "failed"
        ),
        "the row to be claimed and run",
        timeout=120,
    )
    assert controller.events("job_claimed", job_id=job_id)
    assert controller.stop() == 0
