"""One installation owns only its own Jobs (issue 10, defect 1; DESIGN.md "Kubernetes Job
contract"), on the real control plane with KWOK.

An installation is INSTANCE_NAME (the Helm release) plus its database's installation id
(migration 0004): it is in every Job's `dharma.stream/instance` label, in the controller's
watch selector, and (hashed) in the Job's name. Job ids repeat across databases, so without
it two releases sharing a namespace, or a database restored to an older state whose Jobs
still live (ttlSecondsAfterFinished), adopted, recorded and swept each other's Jobs.

Every wait is on a fact (rows, API objects), never on log wording.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from controller.jobspec import Instance, LaunchSpec, build_job, job_name
from controller.settings import ControllerSettings
from devtools.controller_helpers import ControllerProcess, eventually
from devtools.kwok import DELAY, EXIT_CODE, FATE, MESSAGE
from devtools.services import Database, DatabaseFactory
from devtools.simulated_runner import SimulatedCommits
from dharma_common.contract import LABEL_INSTANCE
from dharma_common.settings import load_settings
from tests.controller_fixtures import KubeSetup, instance_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
Start = Callable[..., ControllerProcess]


def fate(**annotations: str) -> str:
    return json.dumps(annotations)


@pytest.fixture
def other_db(db_factory: DatabaseFactory) -> Iterator[Database]:
    """A second database (another release's), with its own installation id."""
    database = db_factory.create()
    yield database
    db_factory.drop(database)


def add_jobs(db: Database, count: int) -> list[int]:
    """Rows whose media need not exist (KWOK decides each pod's fate)."""
    ids = []
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        for _ in range(count):
            cur.execute(
                "INSERT INTO dharma.media_files (category_id, source_path)"
                " VALUES ('talks', '/uploads/simulated.mp4') RETURNING id"
            )
            cur.execute(
                "INSERT INTO dharma.stt_jobs (media_id) VALUES (%s) RETURNING id",
                (cur.fetchone()[0],),
            )
            ids.append(cur.fetchone()[0])
    return ids


def job_rows(db: Database, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    """job id -> (status, attempts, runner_name, failure_reason)."""
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT id, status, attempts, runner_name, failure_reason FROM dharma.stt_jobs"
            " WHERE id = ANY(%s)",
            (ids,),
        )
        found = {r[0]: tuple(r[1:]) for r in cur.fetchall()}
    return found


def all_done(db: Database, ids: list[int]) -> dict[int, tuple[Any, ...]] | None:
    found = job_rows(db, ids)
    done = all(row[0] in ("completed", "failed") for row in found.values())
    return found if done and len(found) == len(ids) else None


def commits_for(kube_setup: KubeSetup, db: Database, instance: Instance) -> SimulatedCommits:
    """The runners' final commit for this installation's succeeding pods only: a runner of
    another installation commits into its own database, never into this one."""
    return SimulatedCommits(kube_setup.kube.api_client, kube_setup.namespace, db.connect,
                            selector=instance.selector)  # fmt: skip


def jobs_by_name(kube_setup: KubeSetup) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in kube_setup.jobs()}


def test_two_installations_share_a_namespace_without_touching_each_others_jobs(
    db: Database, other_db: Database, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Releases `alpha` and `beta`, each with its own database (so the same job ids), in one
    namespace. beta's runners run long: alpha, done first, must not sweep them as "rows that
    moved on", and neither may take the other's Job (same job id and attempt) for its own.
    Every row of both ends `completed` on its first attempt, with its own Job."""
    alpha_env = {
        **kube_setup.env,
        "INSTANCE_NAME": "alpha",
        "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "300ms"}),
    }
    beta_env = {**kube_setup.env, **other_db.env(), "INSTANCE_NAME": "beta",
                "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "8s"})}  # fmt: skip
    alpha, beta = instance_of(alpha_env), instance_of(beta_env)
    assert alpha.installation_id != beta.installation_id
    alpha_ids, beta_ids = add_jobs(db, 3), add_jobs(other_db, 3)
    assert alpha_ids == beta_ids  # two databases, the same job ids
    with ExitStack() as stack:
        stack.enter_context(commits_for(kube_setup, db, alpha))
        stack.enter_context(commits_for(kube_setup, other_db, beta))
        start_controller(beta_env)
        # beta's Jobs exist (and run for 8 s) before alpha starts: alpha's launches of the
        # same job ids and attempts meet them if the names collide.
        eventually(lambda: len(kube_setup.jobs()) == 3 or None, "beta's three Jobs")
        start_controller(alpha_env)
        alpha_rows = eventually(lambda: all_done(db, alpha_ids), "alpha's rows to finish")
        jobs = jobs_by_name(kube_setup)
        for job_id, (status, _, runner_name, reason) in alpha_rows.items():
            assert (status, reason) == ("completed", None), job_id
            # Its own Job, not beta's of the same job id and attempt (adopted on a 409).
            assert jobs[runner_name]["metadata"]["labels"][LABEL_INSTANCE] == alpha.label
        # alpha is done while beta's runners still run: its sweep has seen them.
        running = [j for j in jobs_by_name(kube_setup).values()
                   if j["metadata"]["labels"][LABEL_INSTANCE] == beta.label
                   and not j["status"].get("completionTime")]  # fmt: skip
        assert running, "beta's runners ended before alpha could sweep them; test too slow"
        beta_rows = eventually(lambda: all_done(other_db, beta_ids), "beta's rows to finish",
                               timeout=90)  # fmt: skip
    settings = load_settings(ControllerSettings, **kube_setup.env)
    for instance, found in ((alpha, alpha_rows), (beta, beta_rows)):
        for job_id, (status, attempts, runner_name, reason) in found.items():
            assert (status, attempts, reason) == ("completed", 1, None), (instance, job_id)
            assert runner_name == job_name(settings, instance, job_id, 1)
    jobs = jobs_by_name(kube_setup)
    assert len(jobs) == 6  # nobody deleted anybody's Job
    for name, job in jobs.items():
        label = job["metadata"]["labels"][LABEL_INSTANCE]
        assert label in (alpha.label, beta.label)
        assert not job["metadata"].get("deletionTimestamp"), name
        pods = kube_setup.pods(name)
        assert pods and all(p["metadata"]["labels"][LABEL_INSTANCE] == label for p in pods)


def test_leftover_jobs_of_an_older_database_are_neither_adopted_nor_swept(
    db: Database, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """A restored (or reinstalled) database hands out job ids the old one already used, and
    the old database's Jobs for them are still there: one failed with a permanent error, one
    still running. Same release name, another installation id. The controller makes its own
    Jobs for these attempts, records their outcomes, and leaves the old Jobs alone."""
    env = {**kube_setup.env, "INSTANCE_NAME": "media",
           "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "300ms"})}  # fmt: skip
    ours = instance_of(env)
    old = Instance("media", uuid.uuid4())  # the same release, before the restore
    failed_id, running_id = add_jobs(db, 2)
    settings = load_settings(ControllerSettings, **env)
    leftovers = {}
    for job_id, fate_of_old in (
        (failed_id, {FATE: "fail", EXIT_CODE: "10", MESSAGE: "from the old database"}),
        (running_id, {FATE: "succeed", DELAY: "120s"}),
    ):
        old_settings = settings.model_copy(update={"RUNNER_POD_ANNOTATIONS": fate_of_old})
        media_id = str(uuid.uuid4())
        manifest = build_job(old_settings, LaunchSpec(job_id, 1, media_id, None), old)
        kube_setup.batch.create_namespaced_job(kube_setup.namespace, manifest)
        leftovers[job_id] = manifest["metadata"]["name"]
    # The failed one has failed before the controller starts.
    eventually(lambda: jobs_by_name(kube_setup)[leftovers[failed_id]]["status"].get("failed"),
               "the old database's failed Job")  # fmt: skip
    with commits_for(kube_setup, db, ours):
        start_controller(env)
        found = eventually(lambda: all_done(db, [failed_id, running_id]), "the rows to finish")
        # One more row, finished: later passes (and their sweeps) have run since.
        (later,) = add_jobs(db, 1)
        eventually(lambda: all_done(db, [later]), "a later row to finish")
    for job_id, (status, attempts, runner_name, reason) in found.items():
        assert (status, attempts, reason) == ("completed", 1, None), job_id
        assert runner_name == job_name(settings, ours, job_id, 1) != leftovers[job_id]
    jobs = jobs_by_name(kube_setup)
    for name in leftovers.values():
        assert name in jobs, f"the old database's Job {name} was deleted"
        assert not jobs[name]["metadata"].get("deletionTimestamp")
        assert jobs[name]["metadata"]["labels"][LABEL_INSTANCE] == old.label
    assert not jobs[leftovers[running_id]]["status"].get("completionTime")
