"""Benchmark: one talk's wall time in a real pod on the testbed's real node vs the local
executor, in the same run, on the same input and the same model file.

Both go through the real controller (a host process) from INSERT to `completed`, with the
same PostgreSQL and WebDAV: the local executor runs `dharma-jobrunner` as a subprocess of
the virtualenv (PyPI's pywhispercpp wheel); the Kubernetes executor creates a Job whose pod
runs the runner image (`scripts/images`, whisper.cpp built with OpenBLAS) through the
kubelet, containerd and runc. The difference is what a real pod costs (scheduling, sandbox,
container start, the image's own whisper build). Prints each run and the medians' ratio.

Usage: python -m bench.realnode [--seconds 60] [--repeat 3]
(needs the testbed with its real node: scripts/testbed up; builds the images if needed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2

from devtools.cache import BENCH_CACHE
from devtools.controller_helpers import REPO, ControllerProcess
from devtools.media import MODELS, make_long_talk
from devtools.services import DatabaseFactory, PostgresServer, WebDAVServer

RUNNER_IMAGE = "dharma-stream/jobrunner:dev"


def _script(name: str, *args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [str(REPO / "scripts" / name), *args], check=True, text=True,
        stdout=subprocess.PIPE if capture else None, cwd=REPO,
    )  # fmt: skip
    return result.stdout or ""


def _node() -> dict[str, Any]:
    _script("testbed", "up")
    info: dict[str, Any] = json.loads(_script("testbed", "node-info", capture=True))
    if "skip" in info:
        raise SystemExit(f"the testbed's real node is not running: {info['skip']}")
    _script("images", "build")
    with tempfile.NamedTemporaryFile(suffix=".tar") as tarball:
        subprocess.run([str(REPO / "scripts" / "images"), "save", RUNNER_IMAGE],
                       stdout=tarball, check=True, cwd=REPO)  # fmt: skip
        _script("testbed", "node-import", tarball.name)
    return info


def _kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> None:
    subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=stdin, text=True,
                   check=True, capture_output=True)  # fmt: skip


def _kube_env(info: dict[str, Any], db_env: dict[str, str], dav: WebDAVServer) -> dict[str, str]:
    """A namespace with the runner's ConfigMap and Secret (the node's view of our services),
    and the environment of a Kubernetes-executor controller for it."""
    kubeconfig = _script("testbed", "env", capture=True).strip().partition("=")[2]
    namespace = f"bench-realnode-{uuid.uuid4().hex[:6]}"
    _kubectl(kubeconfig, "create", "namespace", namespace)
    config = {**db_env, **dav.env(), "DB_HOST": info["hostAddress"],
              "WEBDAV_BASE_URL": f"http://{info['hostAddress']}:{dav.port}",
              "WHISPER_LANGUAGE": "en", "WHISPER_THREADS": "2", "LOG_LEVEL": "WARNING"}  # fmt: skip
    secrets = {k: config.pop(k) for k in ("DB_PASSWORD", "WEBDAV_PASSWORD")}
    for kind, name, data in (("configmap", "dharma-stream-runner", config),
                             ("secret generic", "dharma-stream", secrets)):  # fmt: skip
        literals = [f"--from-literal={k}={v}" for k, v in data.items()]
        _kubectl(kubeconfig, "-n", namespace, "create", *kind.split(), name, *literals)
    key, _, value = info["label"].partition("=")
    return {
        "EXECUTOR": "kubernetes", "KUBECONFIG": kubeconfig, "NAMESPACE": namespace,
        "RUNNER_IMAGE": RUNNER_IMAGE, "RUNNER_IMAGE_PULL_POLICY": "Never",
        "RUNNER_CPU_REQUEST": "100m", "RUNNER_MEMORY_REQUEST": "64Mi",
        "RUNNER_NODE_SELECTOR": json.dumps({key: value}),
        "RUNNER_TOLERATIONS": json.dumps(
            [{"key": info["taint"], "operator": "Exists", "effect": "NoSchedule"}]
        ),
    }  # fmt: skip


def _run_once(conn: Any, env: dict[str, str], upload: str, log: Path) -> float:
    """INSERT one job, start a controller, wait for `completed`; seconds from the INSERT."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO dharma.media_files (category_id, source_path)"
                    " VALUES ('bench', %s) RETURNING id", (upload,))  # fmt: skip
        media_id = cur.fetchone()[0]
    controller = ControllerProcess(env, log)
    try:
        time.sleep(2)  # the controller is up and listening before the clock starts
        with conn.cursor() as cur:
            start = time.perf_counter()
            cur.execute("INSERT INTO dharma.stt_jobs (media_id) VALUES (%s) RETURNING id",
                        (media_id,))  # fmt: skip
            job_id = cur.fetchone()[0]
        while True:
            with conn.cursor() as cur:
                cur.execute("SELECT status, error_message FROM dharma.stt_jobs WHERE id = %s",
                            (job_id,))  # fmt: skip
                status, message = cur.fetchone()
            if status == "completed":
                return time.perf_counter() - start
            if status in ("failed", "cancelled") or time.perf_counter() - start > 900:
                raise SystemExit(f"job {job_id}: {status} {message} (log: {log})")
            time.sleep(0.05)
    finally:
        controller.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    source = make_long_talk(BENCH_CACHE, args.seconds, "640x360", "h264")
    info = _node()
    pg, dav = PostgresServer(), WebDAVServer()
    pg.start()
    work = Path(tempfile.mkdtemp(prefix="dharma-bench-realnode-"))
    namespace: tuple[str, str] | None = None
    try:
        db = DatabaseFactory(pg).create()
        conn = psycopg2.connect(**db.settings.connect_kwargs("bench"))
        conn.autocommit = True
        upload = f"/uploads/{source.name}"
        dav.put_file(upload, source)
        common = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "WEBDAV_"))}
        common.update({**db.env(), "METRICS_PORT": "0", "POLL_INTERVAL_SECONDS": "1",
                       "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)})  # fmt: skip
        local = {**common, **dav.env(), "EXECUTOR": "local",
                 "LOCAL_SCRATCH_DIR": str(work / "scratch"),
                 "WHISPER_MODEL": str(MODELS / "ggml-base.bin"), "WHISPER_LANGUAGE": "en",
                 "WHISPER_THREADS": "2"}  # fmt: skip
        kube = {**common, **_kube_env(info, db.env(), dav)}
        namespace = (kube["KUBECONFIG"], kube["NAMESPACE"])
        times: dict[str, list[float]] = {"local executor": [], "real pod": []}
        for i in range(args.repeat):
            for label, env in (("local executor", local), ("real pod", kube)):
                seconds = _run_once(conn, env, upload, work / f"controller-{label[:5]}-{i}.log")
                times[label].append(seconds)
                print(f"run {i + 1}: {label}: {seconds:.2f} s INSERT -> completed", flush=True)
        conn.close()
    finally:
        if namespace:
            _kubectl(namespace[0], "delete", "namespace", namespace[1], "--wait=false")
        dav.close()
        pg.close()
    local_median = statistics.median(times["local executor"])
    pod_median = statistics.median(times["real pod"])
    print(f"\n{source.name} ({args.seconds} s talk), {args.repeat} runs each, medians:")
    print(f"  local executor {local_median:.2f} s; real pod {pod_median:.2f} s;"
          f" real pod / local = {pod_median / local_median:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
