"""What the runner benchmarks share: a claimed attempt to run, and the command that runs it.

The row is inserted as the controller leaves it after a claim (`processing`, attempt 1), so
the runner is measured alone, without a controller or a Kubernetes Job around it.
"""

from __future__ import annotations

import sys
from typing import Any

from dharma_common import contract


def claimed_attempt(conn: Any, source_path: str) -> int:
    """Insert a media row for `source_path` and its job, claimed as attempt 1: the job id."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (category_id, source_path) VALUES ('bench', %s)"
            " RETURNING id", (source_path,),
        )  # fmt: skip
        media_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO dharma.stt_jobs (media_id, status, attempts) VALUES"
            " (%s, 'processing', 1) RETURNING id", (media_id,),
        )  # fmt: skip
        job_id: int = cur.fetchone()[0]
    return job_id


def runner_command(job_id: int) -> list[str]:
    """`python -m jobrunner run` for attempt 1 of `job_id`, with this interpreter."""
    return contract.runner_command(job_id, 1, python=sys.executable)
