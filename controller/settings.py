"""The controller's configuration, read from the environment and validated at start-up.

This is the contract shared with the Helm chart (deploy/helm/dharma-stream renders these
variables into the controller's ConfigMap) and the configuration tables of docs/operations.md.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from controller.quantity import parse_bytes
from dharma_common.models import Catalog, ModelEntry, default_catalog
from dharma_common.settings import DatabaseSettings

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
#: A ConfigMap or Secret name (a DNS subdomain), checked at start-up, not at each launch.
_OBJECT_NAME = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
#: Each memory setting and the one it must not be below (request <= limit <= max).
_MEMORY_ORDER = {
    "RUNNER_MEMORY_LIMIT": "RUNNER_MEMORY_REQUEST",
    "RUNNER_MEMORY_LIMIT_MAX": "RUNNER_MEMORY_LIMIT",
}
#: List and map settings are JSON (one format for every structured value); an example of each
#: for the error message.
_JSON_EXAMPLES = {
    "RUNNER_IMAGE_PULL_SECRETS": '["registry-credentials"]',
    "RUNNER_NODE_SELECTOR": '{"workload": "media"}',
    "RUNNER_TOLERATIONS": '[{"key": "media", "operator": "Exists"}]',
    "RUNNER_AFFINITY": '{"nodeAffinity": {...}}',
    "RUNNER_POD_LABELS": '{"team": "media"}',
    "RUNNER_POD_ANNOTATIONS": '{"example.org/owner": "media"}',
    "RUNNER_MODELS_VOLUME": '{"persistentVolumeClaim": {"claimName": "whisper-models"}}',
}
#: The volume sources RUNNER_MODELS_VOLUME may name, each with its required key.
_MODELS_VOLUME_KINDS = {"persistentVolumeClaim": "claimName", "image": "reference"}
_JSON_LISTS = {"RUNNER_IMAGE_PULL_SECRETS", "RUNNER_TOLERATIONS"}
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _default_namespace() -> str:
    try:
        return _SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


class ControllerSettings(DatabaseSettings):
    """Everything `dharma-controller run` reads from the environment."""

    REMOVED: ClassVar[Mapping[str, str]] = {
        "LOCAL_MEMORY_LIMIT_BYTES": "the local executor limits each runner with"
        " RUNNER_MEMORY_LIMIT, a quantity such as 512Mi (0: no limit)",
    }

    EXECUTOR: str = Field(default="kubernetes", pattern=r"^(kubernetes|local)$")
    #: Global cap on attempts in flight (processing rows), across all replicas.
    MAX_CONCURRENT_JOBS: int = Field(default=4, ge=1, le=10_000)
    CLAIM_BATCH_SIZE: int = Field(default=50, ge=1, le=1000)
    #: Safety-net poll; LISTEN/NOTIFY wakes the controller at once in the normal case.
    POLL_INTERVAL_SECONDS: float = Field(default=10.0, gt=0)
    #: Under a steady stream of wake-ups (a NOTIFY per row, a dozen watch events per Job),
    #: passes start this far apart and share the wake-ups; after a quiet spell the next ten
    #: are served at once (service.pass_budget). Bounded by the 1 s INSERT-to-Job latency
    #: target; 0 runs a pass per wake-up.
    MIN_PASS_INTERVAL_SECONDS: float = Field(default=0.5, ge=0, le=1)
    RETRY_BASE_SECONDS: float = Field(default=30.0, ge=0)
    RETRY_MAX_SECONDS: float = Field(default=3600.0, ge=0)
    #: A runner pod still Pending (image pull errors, unschedulable) this long fails the attempt.
    PENDING_TIMEOUT_SECONDS: float = Field(default=600.0, gt=0)
    #: activeDeadlineSeconds of each attempt (and the local executor's wall-clock limit).
    JOB_DEADLINE_SECONDS: int = Field(default=4 * 3600, ge=1)
    JOB_TTL_SECONDS: int = Field(default=7 * 24 * 3600, ge=0)
    LOG_LEVEL: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    #: Prometheus metrics, /healthz and /readyz (0: no HTTP endpoint).
    METRICS_PORT: int = Field(default=9090, ge=0, le=65535)
    #: A read-only HTML status page at /status on METRICS_PORT (controller/status_page.py).
    STATUS_PAGE_ENABLED: bool = False
    #: This replica's identity (the pod name in Kubernetes); empty means the host name.
    POD_NAME: str = Field(default="", max_length=253)
    #: How often queue depth and oldest-pending age are sampled for /metrics.
    QUEUE_METRICS_INTERVAL_SECONDS: float = Field(default=15.0, gt=0)

    #: Session limits on the controller's connections, so a lock held elsewhere (a manual
    #: transaction, a stuck runner) fails one statement instead of stalling the loop.
    DB_STATEMENT_TIMEOUT_SECONDS: float = Field(default=30.0, gt=0, le=3600)
    DB_LOCK_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=3600)
    DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS: float = Field(default=60.0, gt=0, le=3600)

    # --- Kubernetes executor -------------------------------------------------------------
    NAMESPACE: str = Field(
        default_factory=_default_namespace, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )
    #: Prefix of every Job name: <prefix>-<instance hash>-<job id>-<attempt>. At most 23
    #: characters, so the longest name (8 hex, a bigint job id, an int attempt, three dashes)
    #: stays within the 63 a Job's name may have (its pods' `job-name` label).
    JOB_NAME_PREFIX: str = Field(default="dharma-stt", pattern=r"^[a-z]([-a-z0-9]{0,21}[a-z0-9])?$")
    #: This installation's name (the Helm release). With the database's installation id it
    #: forms the instance label of every Job (controller/jobspec.py `Instance`), so releases
    #: sharing a namespace never touch each other's Jobs. Dots are allowed because Helm
    #: allows them in release names; at most 54 characters, so `<name>-<8 hex>` is a valid
    #: label value (63).
    INSTANCE_NAME: str = Field(
        default="dharma-stream", pattern=r"^[a-z0-9]([-a-z0-9.]{0,52}[a-z0-9])?$"
    )
    RUNNER_IMAGE: str = "ghcr.io/dharma-stream/jobrunner:0.1.0"
    RUNNER_IMAGE_PULL_POLICY: str = Field(
        default="IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$"
    )
    #: Secret names, a JSON list like every list or map setting (see the JSON values below).
    RUNNER_IMAGE_PULL_SECRETS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    RUNNER_SERVICE_ACCOUNT: str = ""
    RUNNER_CPU_REQUEST: str = Field(default="1", pattern=_QUANTITY)
    RUNNER_CPU_LIMIT: str = Field(default="2", pattern=_QUANTITY)
    RUNNER_MEMORY_REQUEST: str = Field(default="1Gi", pattern=_QUANTITY)
    RUNNER_MEMORY_LIMIT: str = Field(default="2Gi", pattern=_QUANTITY)
    #: After an OOM kill the next attempt gets limit x factor, up to this cap.
    RUNNER_MEMORY_LIMIT_MAX: str = Field(default="8Gi", pattern=_QUANTITY)
    RUNNER_OOM_MEMORY_FACTOR: float = Field(default=2.0, ge=1.0, le=16.0)
    RUNNER_SCRATCH_SIZE: str = Field(default="20Gi", pattern=_QUANTITY)
    #: The whisper model catalog, the runner's WHISPER_MODELS (dharma_common/models.py): a job
    #: naming a model not in it fails permanently without a runner; one naming a model with a
    #: `memory` gets that as its memory request and first limit (both executors).
    WHISPER_MODELS: Annotated[Catalog, NoDecode] = Field(default_factory=default_catalog)
    #: A volume mounted read-only at /models/volume in runner pods, JSON: a PVC
    #: {"persistentVolumeClaim": {"claimName": "..."}} or an image volume
    #: {"image": {"reference": "...", "pullPolicy": "IfNotPresent"}} (Kubernetes >= 1.31 with
    #: the ImageVolume feature gate). Empty: models come from the runner image only.
    RUNNER_MODELS_VOLUME: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    #: The runner's own Secret: keys DB_PASSWORD (its database login, a member of role
    #: dharma_runner) and WEBDAV_PASSWORD, each taken by secretKeyRef (jobspec
    #: RUNNER_SECRET_KEYS); nothing else in it reaches a runner, no value is copied.
    RUNNER_SECRET_NAME: str = Field(default="dharma-stream", max_length=253, pattern=_OBJECT_NAME)
    #: ConfigMap with the runner's non-secret settings (DB_HOST, DB_USER, WEBDAV_BASE_URL, ...).
    RUNNER_CONFIGMAP_NAME: str = Field(
        default="dharma-stream-runner", max_length=253, pattern=_OBJECT_NAME
    )
    RUNNER_PRIORITY_CLASS: str = ""
    # JSON values. NoDecode: the validator below parses them, so an empty value means the
    # default and bad JSON is a ConfigError naming the variable (not a traceback).
    RUNNER_NODE_SELECTOR: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    RUNNER_TOLERATIONS: Annotated[list[dict[str, Any]], NoDecode] = Field(default_factory=list)
    RUNNER_AFFINITY: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    RUNNER_POD_LABELS: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    RUNNER_POD_ANNOTATIONS: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # --- Leader election (coordination.k8s.io Lease) ---------------------------------------
    LEADER_ELECTION: bool = False
    LEASE_NAME: str = "dharma-stream-controller"
    LEASE_DURATION_SECONDS: float = Field(default=15.0, gt=1)
    #: Job creations in flight at once (a claimed batch is launched in parallel).
    LAUNCH_CONCURRENCY: int = Field(default=8, ge=1, le=64)
    #: Timeout of one Kubernetes API request (the watch's read timeout is derived from it).
    KUBE_API_TIMEOUT_SECONDS: float = Field(default=30.0, gt=0)
    #: Server-side length of one watch request; the watch then resumes from its last
    #: resourceVersion (and relists if that is too old: 410 Gone).
    KUBE_WATCH_TIMEOUT_SECONDS: int = Field(default=300, ge=1, le=3600)

    # --- Local executor ------------------------------------------------------------------
    #: Per-attempt scratch directories live below this (removed after each attempt).
    LOCAL_SCRATCH_DIR: Path = Path("/tmp/dharma-stream")  # noqa: S108
    #: SIGTERM -> SIGKILL grace for a local runner's process group (deadline, cancellation,
    #: shutdown); the runner uses it to clean up its scratch directory.
    LOCAL_TERMINATION_GRACE_SECONDS: float = Field(default=10.0, ge=0)
    #: The runners' own database login (a member of role dharma_runner, migration 0005) for
    #: the local executor. Set, a runner process gets it as DB_USER/DB_PASSWORD instead of the
    #: controller's; either way no LOCAL_* setting reaches a runner.
    LOCAL_RUNNER_DB_USER: str = ""
    LOCAL_RUNNER_DB_PASSWORD: SecretStr = SecretStr("")

    def connect_kwargs(self, application_name: str) -> dict[str, Any]:
        """DatabaseSettings' arguments plus the session timeouts (startup options, so they
        hold from the first statement and after every reconnect)."""
        kwargs = super().connect_kwargs(application_name)
        limits = {
            "statement_timeout": self.DB_STATEMENT_TIMEOUT_SECONDS,
            "lock_timeout": self.DB_LOCK_TIMEOUT_SECONDS,
            "idle_in_transaction_session_timeout": self.DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
        }
        kwargs["options"] = " ".join(f"-c {k}={round(v * 1000)}" for k, v in limits.items())
        return kwargs

    def identity(self) -> str:
        """This replica's name in `claimed_by`, the Lease and logs."""
        return self.POD_NAME or socket.gethostname()

    @field_validator("RUNNER_IMAGE")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be an image reference such as registry/jobrunner:tag")
        return value

    @field_validator(
        "RUNNER_MEMORY_REQUEST", "RUNNER_MEMORY_LIMIT", "RUNNER_MEMORY_LIMIT_MAX",
        "RUNNER_SCRATCH_SIZE",
    )  # fmt: skip
    @classmethod
    def _memory(cls, value: str, info: ValidationInfo) -> str:
        """Parse with the same function every launch uses: a quantity the pattern admits but
        parse_bytes rejects ("500m" is 0.5 bytes) would otherwise fail each attempt's launch
        until the pending timeout. Also request <= limit <= max; the local executor has no
        request, only the limit (0: none) and its OOM-retry cap (fields are validated in
        declaration order: the smaller one is in `info.data`)."""
        size = parse_bytes(value)  # ValueError -> ConfigError naming the variable
        below = _MEMORY_ORDER.get(info.field_name or "")
        if below == "RUNNER_MEMORY_REQUEST" and info.data.get("EXECUTOR") != "kubernetes":
            below = None
        smaller = info.data.get(below) if below else None
        if smaller is not None and parse_bytes(smaller) > size:
            raise ValueError(f"must not be below {below} ({smaller})")
        return value

    @field_validator(
        "RUNNER_IMAGE_PULL_SECRETS", "RUNNER_NODE_SELECTOR", "RUNNER_TOLERATIONS",
        "RUNNER_AFFINITY", "RUNNER_POD_LABELS", "RUNNER_POD_ANNOTATIONS", "RUNNER_MODELS_VOLUME",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _json(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return [] if info.field_name in _JSON_LISTS else {}
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(
                    f"must be JSON ({exc}), e.g. {_JSON_EXAMPLES[info.field_name or '']}"
                ) from None
        return value

    @field_validator("RUNNER_IMAGE_PULL_SECRETS")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.fullmatch(_OBJECT_NAME, name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a Secret name")
        return value

    @field_validator("WHISPER_MODELS")
    @classmethod
    def _model_memory(
        cls, value: dict[str, ModelEntry], info: ValidationInfo
    ) -> dict[str, ModelEntry]:
        """Each model's memory parses as every launch will parse it, and fits under
        RUNNER_MEMORY_LIMIT_MAX (declared before it), or its first attempt could not start."""
        cap = info.data.get("RUNNER_MEMORY_LIMIT_MAX")
        for name, entry in value.items():
            if entry.memory is None:
                continue
            size = parse_bytes(entry.memory)
            if size <= 0:
                raise ValueError(f"model {name!r}: memory must be more than 0")
            if cap is not None and size > parse_bytes(cap):
                raise ValueError(
                    f"model {name!r}: memory {entry.memory} is above "
                    f"RUNNER_MEMORY_LIMIT_MAX ({cap})"
                )
        return value

    @field_validator("RUNNER_MODELS_VOLUME")
    @classmethod
    def _models_volume(cls, value: dict[str, Any]) -> dict[str, Any]:
        """One source, of a kind runner pods may mount read-only, with what it needs: the
        Job carries it as is, so a mistake is refused here, not by every launch."""
        if not value:
            return value
        if len(value) != 1 or next(iter(value)) not in _MODELS_VOLUME_KINDS:
            raise ValueError(
                "must name one source, persistentVolumeClaim or image, e.g. "
                + _JSON_EXAMPLES["RUNNER_MODELS_VOLUME"]
            )
        kind, source = next(iter(value.items()))
        required = _MODELS_VOLUME_KINDS[kind]
        if not isinstance(source, dict) or not isinstance(source.get(required), str):
            raise ValueError(f"{kind} needs {required}")
        allowed = {required, "pullPolicy"} if kind == "image" else {required, "readOnly"}
        if set(source) - allowed:
            raise ValueError(f"{kind} takes only {', '.join(sorted(allowed))}")
        if kind == "persistentVolumeClaim":
            if not re.fullmatch(_OBJECT_NAME, source[required]) or len(source[required]) > 253:
                raise ValueError(f"{source[required]!r} is not a PersistentVolumeClaim name")
            if source.get("readOnly", True) is not True:
                raise ValueError("the models volume is mounted read-only (readOnly: true)")
        else:
            if not source[required] or any(c.isspace() for c in source[required]):
                raise ValueError("image.reference must be an image reference")
            policy = source.get("pullPolicy", "IfNotPresent")
            if policy not in ("Always", "IfNotPresent", "Never"):
                raise ValueError("image.pullPolicy must be Always, IfNotPresent or Never")
        return value
