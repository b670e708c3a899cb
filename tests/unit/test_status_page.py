"""The status page's rendering (controller/status_page.py) without a database: every value
is escaped, and the throughput intervals cover the whole hour. The page against a real
PostgreSQL and in a real browser: tests/integration/test_status_page.py."""

from __future__ import annotations

import uuid

from controller.settings import ControllerSettings
from controller.status_page import THROUGHPUT_BUCKETS, Snapshot, StatusPage
from dharma_common.settings import load_settings

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="x()">&amp;'


def page(executor: str = "kubernetes") -> StatusPage:
    settings = load_settings(
        ControllerSettings, DB_HOST="db.invalid", DB_USER="u", EXECUTOR=executor,
        NAMESPACE="media", POD_NAME=HOSTILE.replace(" ", ""),
    )  # fmt: skip
    return StatusPage(settings, refresh_seconds=7)


def job(**values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": 7, "media_id": uuid.uuid4(), "title": HOSTILE, "category_id": HOSTILE,
        "attempt_text": "1 of 3", "progress": 0.5, "running_seconds": 65.0,
        "runner_name": HOSTILE, "claimed_by": HOSTILE, "failure_reason": HOSTILE,
        "error_message": HOSTILE, "ago_seconds": 30.0, "log_commands": [HOSTILE],
    }  # fmt: skip
    row.update(values)
    return row


def test_every_value_is_escaped() -> None:
    status = page()
    snapshot = Snapshot(
        depth={"pending": 1}, depth_exact=False, oldest_pending_seconds=3.0,
        inflight=[job()], failures=[job()],
        throughput=status._intervals([{"bucket": 0, "completed": 2, "failed": 1}], 300),
    )  # fmt: skip
    body = status._render(snapshot, None).decode()
    assert "<script" not in body and "<img" not in body
    # the identity twice, four fields of the job in flight, four of the failure
    assert body.count("&lt;script&gt;window.pwned=1&lt;/script&gt;") == 10
    assert "&amp;amp;" in body
    assert '<meta http-equiv="refresh" content="7">' in body
    assert '<progress max="1" value="0.500">50%</progress>' in body
    assert "estimated from the table" in body


def test_an_error_page_escapes_the_reason() -> None:
    body = page()._render(None, HOSTILE).decode()
    assert "The database could not be read: &lt;script&gt;" in body
    assert "<script" not in body


def test_throughput_has_every_interval_oldest_first() -> None:
    rows = [{"bucket": 0, "completed": 2, "failed": 1}, {"bucket": 11, "completed": 0, "failed": 4}]
    intervals = StatusPage._intervals(rows, 300)
    assert len(intervals) == THROUGHPUT_BUCKETS
    assert intervals[0] == {"label": "55-60 min ago", "completed": 0, "failed": 4}
    assert intervals[5]["label"] == "30-35 min ago"
    assert intervals[-1] == {"label": "last 5 min", "completed": 2, "failed": 1}


def test_kubectl_commands_only_where_runners_are_jobs() -> None:
    assert page("kubernetes")._namespace == "media"
    assert page("local")._namespace is None
