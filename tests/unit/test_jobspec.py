"""The Job manifest of one attempt (controller/jobspec.py): contract fields, hardening, and
the `restricted` Pod Security Standard checked field by field. (The end-to-end tests run the
same Jobs in namespaces that *enforce* `restricted` in the real API server.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from controller.jobspec import Instance, LaunchSpec, UnknownModel, build_job, job_name
from controller.settings import ControllerSettings
from dharma_common.contract import (
    LABEL_ATTEMPT,
    LABEL_INSTANCE,
    LABEL_JOB_ID,
    LABEL_MANAGED_BY,
    LABEL_MEDIA_ID,
)
from dharma_common.models import BASE_SHA256
from dharma_common.settings import ConfigError, load_settings

MEDIA = "6f1c7c52-9d3e-4a57-8f1b-0d9f1b2f4c11"
DB_ID = uuid.UUID("0d5e2a71-3c4b-4f6a-9e8d-7c6b5a493827")
INSTANCE = Instance("media-prod", DB_ID)


def settings(**overrides: Any) -> ControllerSettings:
    return load_settings(
        ControllerSettings, DB_HOST="db", DB_USER="u", DB_PASSWORD="db-secret", **overrides
    )


def job(memory_limit: str | None = None, **overrides: Any) -> dict[str, Any]:
    return build_job(settings(**overrides), LaunchSpec(42, 3, MEDIA, memory_limit), INSTANCE)


def pod(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def test_identity_name_labels_and_command() -> None:
    manifest = job(NAMESPACE="media", JOB_NAME_PREFIX="stt")
    assert manifest["metadata"]["name"] == f"stt-{INSTANCE.name_hash}-42-3"
    assert manifest["metadata"]["namespace"] == "media"
    for labels in (
        manifest["metadata"]["labels"],
        manifest["spec"]["template"]["metadata"]["labels"],
    ):
        assert labels[LABEL_JOB_ID] == "42"
        assert labels[LABEL_ATTEMPT] == "3"
        assert labels[LABEL_MEDIA_ID] == MEDIA
        assert labels[LABEL_MANAGED_BY] == "dharma-controller"
        assert labels[LABEL_INSTANCE] == "media-prod-0d5e2a71"
    container = pod(manifest)["containers"][0]
    assert container["command"] == ["dharma-jobrunner", "run", "--job-id", "42", "--attempt", "3"]
    assert container["terminationMessagePolicy"] == "File"


def test_same_attempt_same_manifest() -> None:
    assert job() == job()


def test_job_level_contract() -> None:
    spec = job(JOB_DEADLINE_SECONDS=900, JOB_TTL_SECONDS=3600)["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 900
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"] == {
        "containerName": "runner",
        "operator": "NotIn",
        "values": [0],
    }


def test_configuration_is_referenced_never_copied() -> None:
    manifest = job(RUNNER_SECRET_NAME="stt-secret", RUNNER_CONFIGMAP_NAME="stt-config")
    container = pod(manifest)["containers"][0]
    assert container["envFrom"] == [{"configMapRef": {"name": "stt-config"}}]
    text = json.dumps(manifest)
    assert "db-secret" not in text
    assert {e["name"] for e in container["env"]} == {
        "SCRATCH_DIR", "TMPDIR", "HOME", "DB_PASSWORD", "WEBDAV_PASSWORD",
    }  # fmt: skip


def test_runner_takes_only_its_two_keys_from_the_secret() -> None:
    """Least privilege (issue 10): no `envFrom` of the Secret — whatever else is in it (the
    controller's password, other services' keys) never reaches a runner — and each key by
    `secretKeyRef`, so no value is in the Job."""
    container = pod(job(RUNNER_SECRET_NAME="stt-runner"))["containers"][0]
    assert not [s for s in container["envFrom"] if "secretRef" in s]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "DB_PASSWORD": {"name": "stt-runner", "key": "DB_PASSWORD"},
        "WEBDAV_PASSWORD": {"name": "stt-runner", "key": "WEBDAV_PASSWORD"},
    }


def test_resources_and_oom_override() -> None:
    base = pod(job())["containers"][0]["resources"]
    assert base == {
        "requests": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "20Gi"},
        "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "21Gi"},
    }
    raised = pod(job("4Gi"))["containers"][0]["resources"]
    assert raised["limits"]["memory"] == "4Gi" and raised["requests"]["memory"] == "1Gi"
    # A request above the (lowered) limit would be rejected: it is clamped.
    small = pod(job("512Mi"))["containers"][0]["resources"]
    assert small["requests"]["memory"] == "512Mi"


@pytest.mark.parametrize(
    ("scratch", "request_", "limit"),
    [("20Gi", "20Gi", "21Gi"), ("5Gi", "5Gi", "6Gi"), ("512Mi", "512Mi", "1536Mi"),
     ("10G", "10G", "10814201Ki")],
)  # fmt: skip
def test_ephemeral_storage_follows_the_scratch_size(
    scratch: str, request_: str, limit: str
) -> None:
    """The scheduler must place the runner where its scratch fits; the limit leaves room for
    the container's logs above the emptyDir's sizeLimit."""
    resources = pod(job(RUNNER_SCRATCH_SIZE=scratch))["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == request_
    assert resources["limits"]["ephemeral-storage"] == limit


def test_scratch_volume() -> None:
    spec = pod(job(RUNNER_SCRATCH_SIZE="5Gi"))
    assert spec["volumes"] == [{"name": "scratch", "emptyDir": {"sizeLimit": "5Gi"}}]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "scratch", "mountPath": "/scratch"}]
    assert {"name": "SCRATCH_DIR", "value": "/scratch"} in spec["containers"][0]["env"]


def test_placement_and_extras() -> None:
    tolerations = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}  # fmt: skip
    manifest = job(
        RUNNER_NODE_SELECTOR='{"pool": "media"}',
        RUNNER_TOLERATIONS=json.dumps(tolerations),
        RUNNER_AFFINITY=json.dumps(affinity),
        RUNNER_PRIORITY_CLASS="batch-low",
        RUNNER_IMAGE_PULL_SECRETS='["regcred", "other"]',
        RUNNER_SERVICE_ACCOUNT="runner",
        RUNNER_POD_LABELS='{"team": "media", "dharma.stream/job-id": "spoofed"}',
        RUNNER_POD_ANNOTATIONS='{"example.com/note": "x"}',
    )
    spec = pod(manifest)
    assert spec["nodeSelector"] == {"pool": "media"}
    assert spec["tolerations"] == tolerations
    assert spec["affinity"] == affinity
    assert spec["priorityClassName"] == "batch-low"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert spec["serviceAccountName"] == "runner"
    template_meta = manifest["spec"]["template"]["metadata"]
    assert template_meta["labels"]["team"] == "media"
    assert template_meta["labels"][LABEL_JOB_ID] == "42"  # ours win
    assert template_meta["annotations"] == {"example.com/note": "x"}


def test_defaults_leave_optional_fields_out() -> None:
    spec = pod(job())
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName",
                "imagePullSecrets", "serviceAccountName"):  # fmt: skip
        assert key not in spec


# --------------------------------------------------------------- restricted PSS ---

#: `image` too: k8s.io/pod-security-admission's restrictedVolumes check admits image volumes
#: (read-only by nature; checked in v0.37).
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
                   "persistentVolumeClaim", "projected", "secret"}  # fmt: skip


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The checks of the `restricted` Pod Security Standard (v1.25+) that apply to a pod:
    the pod's own (`_pod_violations`), then each container's (`_container_violations`)."""
    pod_sc = spec.get("securityContext") or {}
    bad = _pod_violations(spec, pod_sc)
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        bad += _container_violations(container, pod_sc)
    return bad


def _pod_violations(spec: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    """The pod-level checks: host namespaces, volume types, sysctls and running as root. A
    separate function so that each level's checks read as one list."""
    bad = [flag for flag in ("hostNetwork", "hostPID", "hostIPC") if spec.get(flag)]
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            bad.append(f"volume {volume['name']}: {kinds}")
    if pod_sc.get("sysctls"):
        bad.append("sysctls")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    return bad


def _container_violations(container: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    """One container's checks, its own security context falling back to the pod's where the
    standard allows (runAsNonRoot, runAsUser, seccompProfile). Each check is a (violated,
    message) pair, so the standard's list reads as a table rather than as branches."""
    sc = container.get("securityContext") or {}
    name = container["name"]
    caps = sc.get("capabilities") or {}
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    checks = [
        (sc.get("privileged"), "privileged"),
        (sc.get("allowPrivilegeEscalation") is not False,
         "allowPrivilegeEscalation must be false"),
        ("ALL" not in (caps.get("drop") or []), "capabilities must drop ALL"),
        (set(caps.get("add") or []) - {"NET_BIND_SERVICE"}, "capabilities added"),
        (not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))), "runAsNonRoot"),
        (sc.get("runAsUser", pod_sc.get("runAsUser")) == 0, "runAsUser 0"),
        (seccomp not in ("RuntimeDefault", "Localhost"), "seccompProfile"),
        (any(p.get("hostPort") for p in container.get("ports") or []), "hostPort"),
        (sc.get("procMount") not in (None, "Default"), "procMount"),
    ]  # fmt: skip
    return [f"{name}: {message}" for violated, message in checks if violated]


def test_pod_passes_the_restricted_pod_security_standard() -> None:
    assert restricted_violations(pod(job())) == []


def test_the_checker_catches_violations() -> None:
    spec = pod(job())
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(spec)) == 2


def test_further_hardening() -> None:
    spec = pod(job())
    container = spec["containers"][0]
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["runAsUser"] == 10001


def test_instance_is_in_label_selector_and_name() -> None:
    """Issue 10, defect 1: one installation's Jobs are told from another's by the release
    and the database's installation id — in the label, the watch selector and the name."""
    assert INSTANCE.label == "media-prod-0d5e2a71"
    assert INSTANCE.selector == (
        "app.kubernetes.io/managed-by=dharma-controller,dharma.stream/instance=media-prod-0d5e2a71"
    )
    s = settings()
    other_release = Instance("media-test", DB_ID)
    other_database = Instance("media-prod", uuid.UUID("6a1f0000-0000-4000-8000-000000000001"))
    names = {job_name(s, i, 42, 3) for i in (INSTANCE, other_release, other_database)}
    assert len(names) == 3
    assert other_release.label != INSTANCE.label != other_database.label
    assert build_job(s, LaunchSpec(42, 3, MEDIA, None), INSTANCE) != build_job(
        s, LaunchSpec(42, 3, MEDIA, None), other_database
    )


def test_instance_label_cannot_be_overridden_by_pod_labels() -> None:
    manifest = job(RUNNER_POD_LABELS='{"dharma.stream/instance": "someone-else"}')
    assert manifest["spec"]["template"]["metadata"]["labels"][LABEL_INSTANCE] == INSTANCE.label


def test_longest_name_and_label_stay_within_63_characters() -> None:
    """The longest prefix, a bigint job id, an int attempt; the longest release name."""
    s = settings(JOB_NAME_PREFIX="p" * 23)
    longest = Instance("r" * 54, DB_ID)
    name = job_name(s, longest, 2**63 - 1, 2**31 - 1)
    assert len(name) == 63
    assert len(longest.label) == 63
    assert load_settings(
        ControllerSettings, DB_HOST="db", DB_USER="u", INSTANCE_NAME="r" * 54
    ).INSTANCE_NAME == "r" * 54  # fmt: skip


@pytest.mark.parametrize("name", ["Bad", "-x", "x-", "a_b", "r" * 55, ""])
def test_bad_instance_name_is_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="INSTANCE_NAME"):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", INSTANCE_NAME=name)


def test_instance_name_default_and_release_names_with_dots() -> None:
    assert settings().INSTANCE_NAME == "dharma-stream"
    assert settings(INSTANCE_NAME="media.prod").INSTANCE_NAME == "media.prod"


@pytest.mark.parametrize("prefix", ["Bad", "-x", "x" * 40, "x" * 24])
def test_bad_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError, match="JOB_NAME_PREFIX"):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", JOB_NAME_PREFIX=prefix)


# ------------------------------------------------------------- models (issue 12, item 3) ---

SMALL_SHA = "1be3a9b2063867b937e64e2ec7483364a79917e157fa98c5d94b5c1fffea987b"
CATALOG = json.dumps({
    "base": {"file": "ggml-base.bin", "sha256": BASE_SHA256},
    "small": {"file": "volume/ggml-small.bin", "sha256": SMALL_SHA, "memory": "3Gi"},
})  # fmt: skip


def model_job(model: str | None, memory_limit: str | None = None, **overrides: Any) -> Any:
    spec = LaunchSpec(42, 3, MEDIA, memory_limit, model)
    return build_job(settings(WHISPER_MODELS=CATALOG, **overrides), spec, INSTANCE)


def test_a_job_naming_a_model_passes_its_name_and_is_sized_by_its_memory() -> None:
    container = pod(model_job("small"))["containers"][0]
    assert {"name": "WHISPER_MODEL", "value": "small"} in container["env"]
    resources = container["resources"]
    assert (resources["requests"]["memory"], resources["limits"]["memory"]) == ("3Gi", "3Gi")
    # After an OOM kill the row's raised limit wins; the request stays the model's need.
    raised = pod(model_job("small", "6Gi"))["containers"][0]["resources"]
    assert (raised["requests"]["memory"], raised["limits"]["memory"]) == ("3Gi", "6Gi")


def test_a_model_without_memory_and_no_model_keep_the_runner_memory_settings() -> None:
    for model in (None, "base"):
        container = pod(model_job(model))["containers"][0]
        resources = container["resources"]
        assert (resources["requests"]["memory"], resources["limits"]["memory"]) == ("1Gi", "2Gi")
    # No model on the row: nothing is passed, the runner's own WHISPER_MODEL stands.
    env = pod(model_job(None))["containers"][0]["env"]
    assert "WHISPER_MODEL" not in {e["name"] for e in env}


def test_an_unknown_model_builds_no_job() -> None:
    with pytest.raises(UnknownModel, match=r"model 'large' is not in the model catalog "
                       r"\(WHISPER_MODELS\); known models: base, small"):  # fmt: skip
        model_job("large")


def test_no_models_volume_by_default() -> None:
    spec = pod(model_job("small"))
    assert [v["name"] for v in spec["volumes"]] == ["scratch"]
    assert [m["name"] for m in spec["containers"][0]["volumeMounts"]] == ["scratch"]


@pytest.mark.parametrize(
    ("setting", "volume"),
    [('{"persistentVolumeClaim": {"claimName": "whisper-models"}}',
      {"persistentVolumeClaim": {"claimName": "whisper-models", "readOnly": True}}),
     ('{"image": {"reference": "registry.example.org/whisper-models:v1"}}',
      {"image": {"reference": "registry.example.org/whisper-models:v1",
                 "pullPolicy": "IfNotPresent"}}),
     ('{"image": {"reference": "registry.example.org/m@sha256:' + "0" * 64 + '", '
      '"pullPolicy": "Always"}}',
      {"image": {"reference": "registry.example.org/m@sha256:" + "0" * 64,
                 "pullPolicy": "Always"}})],
    ids=["pvc", "image", "image-always"],
)  # fmt: skip
def test_models_volume_is_mounted_read_only_below_the_models_directory(
    setting: str, volume: dict[str, Any]
) -> None:
    spec = pod(model_job("small", RUNNER_MODELS_VOLUME=setting))
    assert spec["volumes"][1] == {"name": "models", **volume}
    assert spec["containers"][0]["volumeMounts"][1] == {
        "name": "models", "mountPath": "/models/volume", "readOnly": True,
    }  # fmt: skip
    assert restricted_violations(spec) == []


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [('{"hostPath": {"path": "/models"}}', "persistentVolumeClaim or image"),
     ('{"persistentVolumeClaim": {}}', "needs claimName"),
     ('{"persistentVolumeClaim": {"claimName": "Bad_Name"}}', "not a PersistentVolumeClaim"),
     ('{"persistentVolumeClaim": {"claimName": "m", "readOnly": false}}', "read-only"),
     ('{"image": {"reference": "a b"}}', "image reference"),
     ('{"image": {"reference": "r", "pullPolicy": "Sometimes"}}', "pullPolicy"),
     ('{"image": {"reference": "r", "extra": 1}}', "takes only"),
     ('{"persistentVolumeClaim": {"claimName": "m"}, "image": {"reference": "r"}}', "one source"),
     ("not json", "must be JSON")],
)  # fmt: skip
def test_bad_models_volume_is_refused_at_start_up(setting: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match="RUNNER_MODELS_VOLUME") as caught:
        settings(RUNNER_MODELS_VOLUME=setting)
    assert complaint in str(caught.value)


@pytest.mark.parametrize(
    ("catalog", "complaint"),
    [({"x": {"file": "../etc/passwd", "sha256": "a" * 64}}, "file"),
     ({"x": {"file": "/models/a.bin", "sha256": "a" * 64}}, "file"),
     ({"x": {"file": "volume/.hidden", "sha256": "a" * 64}}, "file"),
     ({"x/../y": {"file": "a.bin", "sha256": "a" * 64}}, "key"),
     ({"x": {"file": "a.bin", "sha256": "A" * 63}}, "sha256"),
     ({"x": {"file": "a.bin", "sha256": "a" * 64, "memory": "500m"}}, "memory"),
     ({"x": {"file": "a.bin", "sha256": "a" * 64, "memory": "16Gi"}},
      "above RUNNER_MEMORY_LIMIT_MAX (8Gi)"),
     ({"x": {"file": "a.bin", "sha256": "a" * 64, "size": 1}}, "Extra inputs"),
     ({}, "at least one model")],
)  # fmt: skip
def test_bad_catalog_is_refused_at_start_up(catalog: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError, match="WHISPER_MODELS") as caught:
        settings(WHISPER_MODELS=json.dumps(catalog))
    assert complaint in str(caught.value)


def test_default_catalog_is_the_images_baked_model() -> None:
    """The default names exactly the file and checksum Dockerfile.worker downloads."""
    text = (Path(__file__).resolve().parents[2] / "Dockerfile.worker").read_text()
    base = settings().WHISPER_MODELS["base"]
    assert f"ARG WHISPER_MODEL_NAME={base.file}" in text
    assert f"ARG WHISPER_MODEL_SHA256={base.sha256}" in text
    assert base.memory is None
