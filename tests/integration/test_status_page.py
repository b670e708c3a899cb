"""The controller's status page (controller/status_page.py) against a real PostgreSQL, served
by the real ProbeServer in this process on 127.0.0.1, read over HTTP and in a real headless
Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By

from controller.jobs_cli import log_commands
from controller.metrics import Health, Metrics, ProbeServer
from controller.settings import ControllerSettings
from controller.status_page import PATH, StatusPage
from controller.store import Q
from devtools.services import Database, free_port
from dharma_common.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NAMESPACE = "media"
HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


# ------------------------------------------------------------------------------ fixtures ---


def controller_settings(db: Database, **overrides: str) -> ControllerSettings:
    return load_settings(
        ControllerSettings, **{**db.env(), "EXECUTOR": "kubernetes", "NAMESPACE": NAMESPACE,
                               "POD_NAME": "controller-0", **overrides}
    )  # fmt: skip


@contextlib.contextmanager
def serving(settings: ControllerSettings) -> Iterator[str]:
    """The probe server with the status page, as `dharma-controller run` wires it."""
    metrics = Metrics()
    metrics.pages[PATH] = StatusPage(settings, refresh_seconds=0).page
    server = ProbeServer(0, metrics, Health(liveness_window=60))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture
def base_url(db: Database) -> Iterator[str]:
    with serving(controller_settings(db)) as url:
        yield url


@pytest.fixture
def sql(db: Database) -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    conn = db.connect()

    def run(statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    yield run
    conn.close()


def add_job(
    sql: Callable[..., list[tuple[Any, ...]]],
    status: str = "pending",
    title: str = "a talk",
    **columns: Any,
) -> tuple[int, uuid.UUID]:
    """A media row and one job in `status`; finished rows get finished_at = now() unless
    `finished_ago` (seconds) says otherwise."""
    ((media_id,),) = sql(
        "INSERT INTO dharma.media_files (category_id, source_path, title)"
        " VALUES ('talks', '/uploads/x.mp4', %s) RETURNING id",
        title,
    )
    ago = columns.pop("finished_ago", 0 if status in ("completed", "failed", "cancelled") else None)
    if status == "processing":
        columns.setdefault("attempts", 1)
        columns["processing_started_at"] = columns.get("processing_started_at", "now")
    names = ["media_id", "status", *columns]
    values = [media_id, status, *columns.values()]
    placeholders = ["%s"] * len(values)
    if ago is not None:
        names.append("finished_at")
        placeholders.append("now() - make_interval(secs => %s)")
        values.append(ago)
    ((job_id,),) = sql(
        f"INSERT INTO dharma.stt_jobs ({', '.join(names)}) VALUES ({', '.join(placeholders)})"
        " RETURNING id",
        *values,
    )
    return job_id, media_id


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - http://127.0.0.1
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()
    except OSError:  # not listening yet
        return 0, {}, ""


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium, with a profile of its own, talking only to 127.0.0.1."""
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    assert chromium and chromedriver, "apt-get install chromium chromium-driver (scripts/bootstrap)"
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager is not used (both paths given)
    with tempfile.TemporaryDirectory(prefix="status-page-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in (
            "--headless=new", "--no-sandbox", f"--user-data-dir={profile}",
            "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--no-pings",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ):  # fmt: skip
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options, service=ChromeService(chromedriver))
        driver.set_page_load_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()


def progress_of(driver: webdriver.Chrome, job_id: int) -> float:
    bar = driver.find_element(By.CSS_SELECTOR, f'#inflight tr[data-job-id="{job_id}"] progress')
    value = driver.execute_script("return arguments[0].value", bar)
    return float(value)


# ------------------------------------------------------------------------------ HTTP ---


def test_page_shows_the_queue_in_flight_failures_and_throughput(
    base_url: str, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    add_job(sql, "pending")
    add_job(sql, "pending")
    running, _ = add_job(sql, "processing", progress=0.25, runner_name="dharma-stt-ab12cd34-3-1")
    add_job(sql, "completed", finished_ago=120)
    add_job(sql, "completed", finished_ago=30 * 60)
    add_job(sql, "completed", finished_ago=2 * 3600)  # outside the hour
    failed, media = add_job(sql, "failed", failure_reason="runner_error_permanent",
                            error_message="source is not readable media",
                            runner_name="dharma-stt-ab12cd34-7-3", attempts=3)  # fmt: skip
    add_job(sql, "failed", failure_reason="timed_out", finished_ago=3 * 86400)  # too old

    code, headers, body = get(base_url + PATH)
    assert code == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    for status, count in [("pending", 2), ("processing", 1), ("completed", 3), ("failed", 2),
                          ("cancelled", 0)]:  # fmt: skip
        assert f'<tr data-status="{status}"><td>{status}</td><td class="n">{count}</td>' in body
    assert f'<tr data-job-id="{running}">' in body
    assert '<progress max="1" value="0.250">' in body
    assert "dharma-stt-ab12cd34-3-1" in body
    assert f'<tr data-job-id="{failed}">' in body
    assert "runner_error_permanent" in body and "source is not readable media" in body
    assert "timed_out" not in body
    job = {"media_id": media, "runner_name": "dharma-stt-ab12cd34-7-3"}
    for command in log_commands(job, NAMESPACE):
        assert f'<code class="logs">{command}</code>' in body
    assert '<td>last 5 min</td><td class="n">1</td><td class="n">1</td>' in body
    assert '<td>30-35 min ago</td><td class="n">1</td><td class="n">0</td>' in body


def test_everything_from_the_database_is_escaped(
    base_url: str, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    add_job(sql, "processing", title=HOSTILE, runner_name="x", progress=0.5)
    add_job(sql, "failed", title=HOSTILE, failure_reason=HOSTILE, error_message=HOSTILE)
    _, _, body = get(base_url + PATH)
    assert "<script" not in body and "<img" not in body
    assert body.count("&lt;script&gt;window.pwned=1&lt;/script&gt;") == 4


def test_only_get_and_head_are_answered(
    base_url: str, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    job_id, _ = add_job(sql, "pending")
    for path in (PATH, "/metrics", "/nothing"):
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            code, headers, body = get(base_url + path, method)
            assert (code, headers["Allow"]) == (405, "GET, HEAD"), (method, path)
            assert "read-only" in body
    code, headers, body = get(base_url + PATH, "HEAD")
    assert code == 200 and body == "" and int(headers["Content-Length"]) > 1000
    assert sql("SELECT status FROM dharma.stt_jobs WHERE id = %s", job_id) == [("pending",)]


def test_database_unavailable_is_a_503_page(db: Database) -> None:
    with serving(controller_settings(db, DB_PORT=str(free_port()))) as url:
        code, headers, body = get(url + PATH)
    assert code == 503
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "The database could not be read: PostgreSQL at" in body
    assert "<table" not in body


def test_an_unmigrated_database_is_a_503_page(db: Database) -> None:
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute("DROP SCHEMA dharma CASCADE")
    with serving(controller_settings(db)) as url:
        code, _, body = get(url + PATH)
    assert code == 503 and "does not exist" in body


def test_the_page_reads_in_one_read_only_transaction(db: Database) -> None:
    """A write slipped into the page's transaction would fail: the session is READ ONLY."""
    page = StatusPage(controller_settings(db))
    snapshot = page.read()
    assert snapshot.depth == {s: 0 for s in ("pending", "processing", "completed", "failed",
                                             "cancelled")}  # fmt: skip
    assert len(snapshot.throughput) == 12


def test_each_query_of_the_page_has_an_indexed_path(
    sql: Callable[..., list[tuple[Any, ...]]],
) -> None:
    """Cheap on a long history (bench/queries.py): with sequential scans priced out, no status
    query reads dharma.stt_jobs whole; the finished rows come from stt_jobs_finished_idx."""
    for _ in range(50):
        add_job(sql, "completed", finished_ago=86400)
    sql("ANALYZE dharma.stt_jobs")
    sql("SET enable_seqscan = off")
    params = {"limit": 20, "window": 3600, "bucket": 300, "buckets": 12}
    for name, index in (("status_inflight", "stt_jobs_processing_idx"),
                        ("status_failures", "stt_jobs_finished_idx"),
                        ("status_throughput", "stt_jobs_finished_idx")):  # fmt: skip
        plan = explain(sql, Q[name], params)
        nodes = list(walk(plan[0]["Plan"]))
        assert index in {node.get("Index Name") for node in nodes}, (name, plan)
        seq = [
            n for n in nodes if n["Node Type"] == "Seq Scan" and n["Relation Name"] == "stt_jobs"
        ]
        assert seq == [], (name, plan)


def explain(sql: Callable[..., list[tuple[Any, ...]]], query: str, params: dict[str, Any]) -> Any:
    """The JSON plan of a named query with these (integer) parameters."""
    text = query
    for name, value in params.items():
        text = text.replace(f"%({name})s", str(int(value)))
    ((plan,),) = sql("EXPLAIN (FORMAT JSON) " + text)
    return plan


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def test_dharma_controller_run_serves_the_page_only_when_enabled(
    controller_env: dict[str, str], start_controller: Callable[..., Any]
) -> None:
    """The wiring of `dharma-controller run` (controller/run.py): /status with
    STATUS_PAGE_ENABLED=true, 404 by default."""
    for enabled, expected in (("true", 200), ("false", 404)):
        port = free_port()
        env = {**controller_env, "METRICS_PORT": str(port), "STATUS_PAGE_ENABLED": enabled}
        controller = start_controller(env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while get(url + "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "the controller's probes never answered"
            time.sleep(0.1)
        code, _, body = get(url + PATH)
        assert code == expected
        if expected == 200:
            assert "Executor local" in body and controller_env["POD_NAME"] in body
        assert controller.stop() == 0


# ------------------------------------------------------------------------------ browser ---


def test_browser_follows_a_run_from_progress_to_failure(
    browser: webdriver.Chrome, base_url: str, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    add_job(sql, "pending")
    job_id, media = add_job(sql, "processing", progress=0.1, title="Dharma talk 1",
                            runner_name="dharma-stt-ab12cd34-1-1")  # fmt: skip
    browser.get(base_url + PATH)
    assert progress_of(browser, job_id) == pytest.approx(0.1)
    row = browser.find_element(By.CSS_SELECTOR, f'#inflight tr[data-job-id="{job_id}"]')
    assert row.find_element(By.CSS_SELECTOR, ".runner").text == "dharma-stt-ab12cd34-1-1"
    assert row.find_element(By.CSS_SELECTOR, ".title").text == "Dharma talk 1"
    queue = browser.find_element(By.ID, "queue").text
    assert "pending 1" in queue and "processing 1" in queue

    sql("UPDATE dharma.stt_jobs SET progress = 0.6 WHERE id = %s", job_id)
    browser.refresh()
    assert progress_of(browser, job_id) == pytest.approx(0.6)
    assert "60%" in browser.find_element(By.ID, "inflight").text

    sql(
        "UPDATE dharma.stt_jobs SET status = 'failed', finished_at = now(),"
        " failure_reason = 'oom_killed', error_message = 'OOM-killed (limit 2Gi)' WHERE id = %s",
        job_id,
    )
    browser.refresh()
    assert not browser.find_elements(By.ID, "inflight")
    row = browser.find_element(By.CSS_SELECTOR, f'#failures tr[data-job-id="{job_id}"]')
    assert row.find_element(By.CSS_SELECTOR, ".reason").text == "oom_killed"
    assert row.find_element(By.CSS_SELECTOR, ".message").text == "OOM-killed (limit 2Gi)"
    commands = [c.text for c in row.find_elements(By.CSS_SELECTOR, "code.logs")]
    expected = log_commands({"media_id": media, "runner_name": "dharma-stt-ab12cd34-1-1"},
                            NAMESPACE)  # fmt: skip
    assert commands == expected
    assert f"kubectl -n {NAMESPACE} logs job/dharma-stt-ab12cd34-1-1" in commands
    throughput = browser.find_element(By.ID, "throughput").text.splitlines()
    assert throughput[-1] == "last 5 min 0 1"


def test_browser_shows_hostile_text_as_text(
    browser: webdriver.Chrome, base_url: str, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    running, _ = add_job(sql, "processing", title=HOSTILE, progress=0.3, runner_name=HOSTILE)
    failed, _ = add_job(sql, "failed", title=HOSTILE, failure_reason="runner_error_permanent",
                        error_message=HOSTILE)  # fmt: skip
    browser.get(base_url + PATH)
    assert browser.execute_script("return typeof window.pwned") == "undefined"
    assert browser.execute_script("return document.querySelectorAll('script, img').length") == 0
    text = browser.find_element(By.TAG_NAME, "body").text
    assert text.count(HOSTILE) == 4  # two titles, a runner name, a message
    in_flight = browser.find_element(By.CSS_SELECTOR, f'#inflight tr[data-job-id="{running}"]')
    assert in_flight.find_element(By.CSS_SELECTOR, ".title").text == HOSTILE
    message = browser.find_element(
        By.CSS_SELECTOR, f'#failures tr[data-job-id="{failed}"] .message'
    )
    assert message.text == HOSTILE
    assert browser.execute_script("return arguments[0].children.length", message) == 0


def test_browser_post_is_refused(
    browser: webdriver.Chrome, base_url: str, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    job_id, _ = add_job(sql, "pending")
    browser.get("about:blank")
    browser.execute_script(
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "const i = document.createElement('input'); i.name = 'status'; i.value = 'cancelled';"
        "f.appendChild(i); document.body.appendChild(f); f.submit();",
        base_url + PATH,
    )
    browser.find_element(By.TAG_NAME, "pre")  # Chromium shows a text/plain body in <pre>
    assert "method not allowed" in browser.find_element(By.TAG_NAME, "body").text
    assert sql("SELECT status FROM dharma.stt_jobs WHERE id = %s", job_id) == [("pending",)]
