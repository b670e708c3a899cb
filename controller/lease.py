"""Leader election on a coordination.k8s.io/v1 Lease, so of two replicas only one acts.

client-go's algorithm, reduced to what the controller needs: the holder renews the Lease
every LEASE_DURATION_SECONDS/3; a candidate takes it over when the Lease record has not
changed for LEASE_DURATION_SECONDS *as measured by the candidate's own clock* (no clock
comparison between machines). Updates carry the resourceVersion, so two candidates cannot
both win a takeover. The holder stops acting once its last successful renewal is older than
2/3 of the duration — before anyone else may take over. On SIGTERM it releases the Lease so
the standby takes over at once.

Only the leader claims, launches, records and deletes; the duplicate-free launch does not
depend on this (deterministic Job names do that), but double work and racing deletions do.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.settings import ControllerSettings
from controller.threads import WatchedThread
from dharma_common.errors import first_line

log = logging.getLogger(__name__)


def _microtime(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, settings: ControllerSettings, api: client.ApiClient) -> None:
        # Any: requests and responses are plain JSON dicts, not the generated models.
        self._api: Any = client.CoordinationV1Api(api)
        self._name = settings.LEASE_NAME
        self._namespace = settings.NAMESPACE
        self._identity = settings.identity()
        self._duration = settings.LEASE_DURATION_SECONDS
        self._timeout = min(settings.KUBE_API_TIMEOUT_SECONDS, self._duration / 3)
        self._valid_until = 0.0
        self._observed: tuple[Any, Any] | None = None
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._wake: Callable[[], None] = lambda: None
        self._thread = WatchedThread(self._run, "lease")
        self._was_leader = False

    def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._thread.start()

    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    def stop(self) -> None:
        self._stop.set()
        self._thread.stop(timeout=5)
        if self.is_leader():
            self._release()
        self._valid_until = 0.0

    def problem(self) -> str | None:
        """Why leadership is no longer being renewed (the lease thread died), else None."""
        return self._thread.problem()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                won = self._try()
            except Exception as exc:  # API unreachable: keep the lease only while valid
                log.warning(
                    "lease renewal failed",
                    extra={"action": "lease_renewal_failed", "error": first_line(exc)},
                )
                won = False
            if won:
                self._valid_until = started + self._duration * 2 / 3
            leading = self.is_leader()
            if leading != self._was_leader:
                self._was_leader = leading
                log.info(
                    "leadership changed",
                    extra={
                        "action": "leadership_changed",
                        "leader": leading,
                        "lease": self._name,
                        "identity": self._identity,
                    },
                )
                self._wake()
            self._stop.wait(self._duration / 3)

    def _body(self, version: str | None, transitions: int, acquired: str) -> dict[str, Any]:
        now = _microtime(dt.datetime.now(dt.timezone.utc))
        metadata: dict[str, Any] = {"name": self._name, "namespace": self._namespace}
        if version:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self._identity,
                "leaseDurationSeconds": max(1, round(self._duration)),
                "acquireTime": acquired or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def _try(self) -> bool:
        """One acquire-or-renew round; True if we hold the Lease afterwards."""
        try:
            lease = self._read()
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self._api.create_namespaced_lease(
                    self._namespace, self._body(None, 0, ""), _request_timeout=self._timeout
                )
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        transitions = spec.get("leaseTransitions") or 0
        acquired = spec.get("acquireTime") or ""
        holder = spec.get("holderIdentity")
        if holder == self._identity:
            return self._replace(self._body(version, transitions, acquired))
        record = (holder, spec.get("renewTime"))
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder and now - self._observed_at < self._duration:
            return False
        log.info(
            "taking over the lease", extra={"action": "lease_taken_over", "previous_holder": holder}
        )
        return self._replace(self._body(version, transitions + 1, ""))

    def _read(self) -> dict[str, Any]:
        response = self._api.read_namespaced_lease(
            self._name, self._namespace, _preload_content=False, _request_timeout=self._timeout
        )
        lease: dict[str, Any] = json.loads(response.data)
        return lease

    def _replace(self, body: dict[str, Any]) -> bool:
        try:
            self._api.replace_namespaced_lease(
                self._name, self._namespace, body, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it first
                return False
            raise
        return True

    def _release(self) -> None:
        """Hand over at once on shutdown (holder cleared, as client-go does)."""
        try:
            lease = self._api.read_namespaced_lease(
                self._name, self._namespace, _request_timeout=self._timeout
            )
            if lease.spec.holder_identity != self._identity:
                return
            body = self._body(
                lease.metadata.resource_version, lease.spec.lease_transitions or 0, ""
            )
            body["spec"]["holderIdentity"] = None
            body["spec"]["leaseDurationSeconds"] = 1
            self._replace(body)
            log.info("lease released", extra={"action": "lease_released", "lease": self._name})
        except Exception as exc:
            log.warning(
                "lease not released",
                extra={"action": "lease_release_failed", "error": first_line(exc)},
            )
