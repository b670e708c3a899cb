"""The Helm chart, rendered by the real `helm` (no cluster needed).

Why: the chart is the user's first contact with the project, and its ConfigMaps are the
controller's and runner's whole configuration. These tests hold it to the settings classes
(every variable rendered, every rendered value valid), to least privilege, and to "secrets by
reference only". The API server's verdict on the same manifests is in test_chart_e2e.py.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.jobspec import Instance, LaunchSpec, build_job
from controller.settings import ControllerSettings
from dharma_common.contract import LABEL_INSTANCE, LABEL_MEDIA_ID
from dharma_common.models import default_catalog
from jobrunner.settings import RunnerSettings
from tests.deploy.chart import (
    CHART,
    FULL_VALUES,
    MINIMAL_SET,
    NETWORK_SET,
    REPO_ROOT,
    Manifest,
    controller_env,
    controller_settings,
    find,
    helm,
    kinds,
    pod_specs,
    render,
    runner_env,
    runner_settings,
    secret_values,
    values_args,
)

FULL = (FULL_VALUES,)
#: Set by Kubernetes per pod (downward API) or from the Secret, never by the ConfigMap.
NOT_IN_CONFIGMAP = {"DB_PASSWORD", "POD_NAME"}
#: The local executor's settings: the chart always runs the Kubernetes executor.
LOCAL_ONLY_PREFIX = "LOCAL_"


def defaults(values: tuple[Path, ...]) -> tuple[str, ...]:
    """--set items for a render of `values`: the default values need the runners' CIDRs."""
    return () if values else NETWORK_SET


@pytest.mark.parametrize("values", [(), FULL], ids=["default", "full"])
def test_helm_lint_strict(values: tuple[Path, ...]) -> None:
    result = helm("lint", "--strict", str(CHART), *values_args(values, defaults(values)))
    assert "0 chart(s) failed" in result.stdout


def test_default_values_render_the_expected_objects() -> None:
    manifests = render(set_values=NETWORK_SET)
    assert kinds(manifests) == sorted(
        [
            "ConfigMap", "ConfigMap", "Deployment", "Job", "NetworkPolicy", "NetworkPolicy",
            "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Secret", "Secret",
            "Service", "ServiceAccount",
        ]
    )  # fmt: skip
    job = find(manifests, "Job", "-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "dharma-controller",
        "migrate",
    ]


def test_full_values_render_every_optional_object() -> None:
    manifests = render(FULL)
    assert kinds(manifests) == sorted(
        [
            "ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy",
            "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Secret",
            "Service", "ServiceAccount", "ServiceMonitor",
        ]
    )  # fmt: skip
    # migrations.mode=initContainer: no hook Job, an init container instead.
    deployment = find(manifests, "Deployment")
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["command"] for c in init] == [["dharma-controller", "migrate"]]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "@sha256:" + "0" * 64
    )


def test_migrations_can_be_left_to_the_operator() -> None:
    manifests = render(set_values=["migrations.mode=none", *NETWORK_SET])
    assert not [m for m in manifests if m["kind"] == "Job"]
    assert "initContainers" not in find(manifests, "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("values", [(), FULL], ids=["default", "full"])
def test_controller_configmap_renders_every_setting(values: tuple[Path, ...]) -> None:
    """Every ControllerSettings variable is in the ConfigMap, so the chart is the complete,
    visible configuration; a new setting without a chart value fails here."""
    env = controller_env(render(values, MINIMAL_SET))
    expected = {
        name
        for name in ControllerSettings.model_fields
        if name not in NOT_IN_CONFIGMAP and not name.startswith(LOCAL_ONLY_PREFIX)
    }
    assert sorted(expected - set(env)) == []
    assert not NOT_IN_CONFIGMAP & set(env)
    assert all(isinstance(value, str) for value in env.values())


def test_default_values_give_valid_settings() -> None:
    manifests = render(set_values=MINIMAL_SET, namespace="media")
    settings = controller_settings(manifests)
    assert settings.EXECUTOR == "kubernetes"
    assert settings.NAMESPACE == "media"
    assert settings.LEADER_ELECTION is False
    assert settings.RUNNER_IMAGE == "ghcr.io/dharma-stream/jobrunner:0.1.0"
    assert (
        find(manifests, "Secret", "-dharma-stream-runner")["metadata"]["name"]
        == settings.RUNNER_SECRET_NAME
    )
    assert (
        find(manifests, "ConfigMap", "-runner")["metadata"]["name"]
        == settings.RUNNER_CONFIGMAP_NAME
    )
    runner = runner_settings(manifests)
    # No WHISPER_MODEL in the ConfigMap: the image's own (`base`, /models/ggml-base.bin).
    assert runner.WHISPER_MODEL == "base"
    # One catalog for both programs, and it is the programs' own default (the image's model).
    assert runner.WHISPER_MODELS == settings.WHISPER_MODELS == default_catalog()
    assert settings.RUNNER_MODELS_VOLUME == {}
    assert runner.WHISPER_LANGUAGE == "zh"
    assert runner.WEBDAV_BASE_URL == "https://dav.example.org/media"


def test_full_values_reach_the_settings_unchanged() -> None:
    values = yaml.safe_load(FULL_VALUES.read_text())
    manifests = render(FULL, namespace="media")
    settings = controller_settings(manifests)
    runner = values["runner"]
    assert settings.LEADER_ELECTION is True
    assert settings.LEASE_DURATION_SECONDS == 20
    assert settings.DB_PORT == 6543
    assert settings.DB_SSLMODE == "verify-full"
    assert settings.METRICS_PORT == 9102
    assert settings.STATUS_PAGE_ENABLED is True
    assert settings.JOB_NAME_PREFIX == "talk"
    assert runner["deadlineSeconds"] == settings.JOB_DEADLINE_SECONDS
    assert runner["ttlSecondsAfterFinished"] == settings.JOB_TTL_SECONDS
    assert runner["pendingTimeoutSeconds"] == settings.PENDING_TIMEOUT_SECONDS
    assert settings.RUNNER_IMAGE == "registry.example.org/dharma/jobrunner:0.1.0-rc1"
    assert settings.RUNNER_IMAGE_PULL_POLICY == "Always"
    assert settings.RUNNER_IMAGE_PULL_SECRETS == ["registry-credentials", "mirror-credentials"]
    assert settings.RUNNER_SERVICE_ACCOUNT == "dharma-runner"
    assert (settings.RUNNER_CPU_REQUEST, settings.RUNNER_CPU_LIMIT) == ("1500m", "4")
    assert (settings.RUNNER_MEMORY_REQUEST, settings.RUNNER_MEMORY_LIMIT) == ("3Gi", "6Gi")
    assert settings.RUNNER_MEMORY_LIMIT_MAX == "24Gi"
    assert settings.RUNNER_OOM_MEMORY_FACTOR == 1.5
    assert settings.RUNNER_SCRATCH_SIZE == "100Gi"
    assert settings.RUNNER_PRIORITY_CLASS == "batch-low"
    assert runner["nodeSelector"] == settings.RUNNER_NODE_SELECTOR
    assert runner["tolerations"] == settings.RUNNER_TOLERATIONS
    assert runner["affinity"] == settings.RUNNER_AFFINITY
    assert runner["podLabels"] == settings.RUNNER_POD_LABELS
    assert runner["podAnnotations"] == settings.RUNNER_POD_ANNOTATIONS
    assert settings.RETRY_BASE_SECONDS == 15.5
    assert settings.MAX_CONCURRENT_JOBS == 20
    # Whole numbers stay whole (YAML numbers reach templates as floats).
    assert runner_env(manifests)["MAX_SOURCE_BYTES"] == "53687091200"
    parsed = runner_settings(manifests)
    assert parsed.MAX_SOURCE_BYTES == 53687091200
    assert parsed.WHISPER_THREADS == 4
    assert parsed.WHISPER_LANGUAGE == "auto"
    assert parsed.WHISPER_BEAM_SIZE == 5
    assert parsed.CHINESE_SCRIPT == "taiwan"
    assert runner["config"]["WHISPER_PROMPTS"] == parsed.WHISPER_PROMPTS
    assert parsed.OVERLAP_VIDEO_ENCODE is True
    assert sorted(parsed.WHISPER_MODELS) == sorted(settings.WHISPER_MODELS) == ["base", "small"]
    assert settings.WHISPER_MODELS["small"].memory == "2Gi"
    assert settings.RUNNER_MODELS_VOLUME == {
        "persistentVolumeClaim": {"claimName": "whisper-models"}
    }


def test_runner_job_built_from_chart_values_uses_the_charts_objects() -> None:
    """The Job the controller would create references exactly the ConfigMap and Secret the
    chart made, and carries the chart's scheduling settings."""
    manifests = render(FULL, namespace="media")
    settings = controller_settings(manifests)
    installation = uuid.UUID("5e0c2b9a-0d4f-4f7e-9a51-8c3d2e1f0a6b")
    job = build_job(
        settings,
        LaunchSpec(job_id=7, attempt=1, media_id="0b6f9c1e-8f43-4d1e-9a55-0d7b7c1f2a10",
                   memory_limit=None),
        Instance(settings.INSTANCE_NAME, installation),
    )  # fmt: skip
    pod = job["spec"]["template"]["spec"]
    refs = {
        next(iter(ref)): next(iter(ref.values()))["name"] for ref in pod["containers"][0]["envFrom"]
    }
    assert refs["configMapRef"] == find(manifests, "ConfigMap", "-runner")["metadata"]["name"]
    assert "secretRef" not in refs
    runner_secret = find(manifests, "Secret", "-runner")
    secret_refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in pod["containers"][0]["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secret_refs == {
        key: {"name": runner_secret["metadata"]["name"], "key": key}
        for key in ("DB_PASSWORD", "WEBDAV_PASSWORD")
    }
    # Exactly the keys the Job reads: the Secret holds nothing a runner does not need.
    assert set(runner_secret["data"]) == set(secret_refs)
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "c6i.2xlarge",
                                   "workload": "media"}  # fmt: skip
    assert pod["priorityClassName"] == "batch-low"
    assert pod["serviceAccountName"] == "dharma-runner"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"},
                                       {"name": "mirror-credentials"}]  # fmt: skip
    assert job["spec"]["activeDeadlineSeconds"] == 28800
    assert job["metadata"]["namespace"] == "media"
    assert job["metadata"]["labels"][LABEL_MEDIA_ID] == "0b6f9c1e-8f43-4d1e-9a55-0d7b7c1f2a10"
    assert job["metadata"]["labels"][LABEL_INSTANCE] == "t-5e0c2b9a"  # release `t`


@pytest.mark.parametrize("release", ["media-prod", "media.staging"])
def test_instance_name_is_the_release_name(release: str) -> None:
    """Issue 10, defect 1: two releases in one namespace are two installations, whose
    controllers never touch each other's Jobs (with the database's installation id)."""
    settings = controller_settings(render(set_values=MINIMAL_SET, release=release))
    assert release == settings.INSTANCE_NAME


@pytest.mark.parametrize(
    ("replicas", "leader", "strategy"), [(1, "false", "Recreate"), (2, "true", "RollingUpdate")]
)
def test_leader_election_follows_replicas(replicas: int, leader: str, strategy: str) -> None:
    manifests = render(set_values=[f"controller.replicas={replicas}", *NETWORK_SET])
    assert controller_env(manifests)["LEADER_ELECTION"] == leader
    assert find(manifests, "Deployment")["spec"]["strategy"]["type"] == strategy


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("controller.replicas=two", "at '/controller/replicas': got string, want integer"),
        ("runner.config.X264_PRESET=turbo", "/runner/config/X264_PRESET"),
        ("runner.resources.limits.memory=lots", "/runner/resources/limits/memory"),
        ("databse.host=db", "databse"),
        ("migrations.mode=sometimes", "/migrations/mode"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(setting: str, complaint: str) -> None:
    result = helm("template", "t", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr, result.stderr


def test_schema_is_valid_json_with_no_remote_references() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert "$ref" not in json.dumps(schema)


def test_passwords_land_only_in_secret_manifests() -> None:
    manifests = render(FULL)
    values = yaml.safe_load(FULL_VALUES.read_text())
    secret = values["secret"]
    passwords = {secret["dbPassword"], secret["webdavPassword"]}
    passwords.add(values["runner"]["secret"]["dbPassword"])
    assert set(secret_values(manifests).values()) == passwords
    for manifest in manifests:
        if manifest["kind"] != "Secret":
            text = yaml.safe_dump(manifest)
            assert not [p for p in passwords if p in text], manifest["metadata"]["name"]


def test_existing_secret_is_referenced_and_nothing_is_created() -> None:
    manifests = render(set_values=["secret.existingSecret=dharma-credentials",
                                   "secret.dbPassword=ignored", *NETWORK_SET])  # fmt: skip
    assert "Secret" not in kinds(manifests)
    assert controller_env(manifests)["RUNNER_SECRET_NAME"] == "dharma-credentials"
    refs = [
        env["valueFrom"]["secretKeyRef"]
        for spec in pod_specs(manifests).values()
        for container in spec["containers"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    ]
    assert refs == [
        {"name": "dharma-credentials", "key": "DB_PASSWORD"},
        {"name": "dharma-credentials", "key": "DB_PASSWORD"},
    ]


def test_controller_gets_its_password_by_reference() -> None:
    deployment = find(render(FULL), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "dharma",
        "key": "DB_PASSWORD",
    }
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert all("value" not in e for e in env.values())


@pytest.mark.parametrize("values", [(), FULL], ids=["default", "full"])
def test_role_is_least_privilege(values: tuple[Path, ...]) -> None:
    rules = find(render(values, defaults(values)), "Role")["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert not {"secrets", "pods/exec", "pods/attach", "pods/portforward"} & set(
            rule["resources"]
        )
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    required = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    required |= {("", "pods", v) for v in ("get", "list", "watch")}
    required |= {("coordination.k8s.io", "leases", v) for v in ("create", "get", "update")}
    # The Events on runner Jobs (controller/events.py; rbac.events, on by default).
    required |= {("events.k8s.io", "events", "create")}
    assert required <= granted
    optional = {("", "pods/log", "get")}
    assert granted - required <= optional


def test_events_can_be_left_out_of_the_role() -> None:
    """rbac.events=false: no Events are posted (the controller counts them as dropped)."""
    rules = find(render(set_values=["rbac.events=false", *NETWORK_SET]), "Role")["rules"]
    assert all("events" not in rule["resources"] for rule in rules)


def _restricted(spec: Manifest) -> list[str]:
    """What in a pod spec violates the restricted Pod Security Standard (the fields it checks)."""
    problems = []
    pod_ctx = spec.get("securityContext", {})
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        ctx = {**pod_ctx, **container.get("securityContext", {})}
        name = container["name"]
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser") == 0:
            problems.append(f"{name}: runAsNonRoot")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities")
        if ctx.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: seccomp")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem (our own rule)")
    return problems


@pytest.mark.parametrize("values", [(), FULL], ids=["default", "full"])
def test_every_chart_pod_is_hardened(values: tuple[Path, ...]) -> None:
    specs = pod_specs(render(values, defaults(values)))
    assert specs
    assert {name: _restricted(spec) for name, spec in specs.items()} == {n: [] for n in specs}
    for name, spec in specs.items():
        if name.startswith("Job/"):
            assert spec["automountServiceAccountToken"] is False


def test_notes_show_how_to_follow_one_media_file() -> None:
    result = helm("install", "t", str(CHART), "--dry-run=client", "--namespace", "media",
                  *values_args(set_values=MINIMAL_SET))  # fmt: skip
    notes = result.stdout.partition("NOTES:")[2]
    assert f"kubectl -n media logs -l {LABEL_MEDIA_ID}=<uuid>" in notes
    assert "kubectl -n media logs job/<runner_name from the row>" in notes
    assert "WARNING" not in notes


@pytest.mark.parametrize("enabled", [False, True])
def test_status_page_is_off_by_default_and_the_notes_say_how_to_open_it(enabled: bool) -> None:
    extra = ["statusPage.enabled=true"] if enabled else []
    env = controller_env(render(set_values=[*MINIMAL_SET, *extra]))
    assert env["STATUS_PAGE_ENABLED"] == str(enabled).lower()
    result = helm("install", "t", str(CHART), "--dry-run=client", "--namespace", "media",
                  *values_args(set_values=[*MINIMAL_SET, *extra]))  # fmt: skip
    notes = result.stdout.partition("NOTES:")[2]
    command = "kubectl -n media port-forward deploy/t-dharma-stream-controller 9090"
    assert (command in notes and "http://localhost:9090/status" in notes) is enabled


def test_notes_warn_about_missing_connection_settings() -> None:
    notes = helm(
        "install", "t", str(CHART), "--dry-run=client", *values_args(set_values=NETWORK_SET)
    ).stdout.partition("NOTES:")[2]
    assert "not configured yet: database.host, database.user, webdav.baseUrl" in notes


def _schema_config_keys(component: str) -> set[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return set(schema["properties"][component]["properties"]["config"]["properties"])


def _template_keys(template: str) -> set[str]:
    """The variables a ConfigMap template sets from structured values (`set $env "NAME"`,
    and the database settings every component shares)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    database = re.search(r'define "dharma-stream.databaseEnv".*?toJson', helpers, re.S)
    assert database
    text = (CHART / "templates" / template).read_text() + database.group(0)
    return set(re.findall(r'(?:set \$env |dict |\$db\.\w+ )"([A-Z][A-Z0-9_]*)"', text))


#: Set by the runner Job itself (controller/jobspec.py), or from the runners' Secret.
RUNNER_FROM_THE_JOB = {"SCRATCH_DIR", "DB_PASSWORD", "WEBDAV_PASSWORD"}


def test_schema_types_exactly_the_free_runner_settings() -> None:
    """Each runner variable is either rendered from structured values (database, webdav,
    the Secret, the Job spec's SCRATCH_DIR) or typed under runner.config, so a wrong type is
    caught by `helm install`, not by a failing runner pod; runner.config names nothing else
    (the schema refuses other names, so a typo fails the install)."""
    structured = _template_keys("configmap-runner.yaml") | RUNNER_FROM_THE_JOB
    assert {"DB_HOST", "DB_USER", "WEBDAV_BASE_URL"} <= structured
    free = set(RunnerSettings.model_fields) - structured
    assert sorted(_schema_config_keys("runner") ^ free) == []
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["runner"]["config"]
    assert sorted(set(defaults) - free) == []


def test_schema_types_exactly_the_free_controller_settings() -> None:
    """The controller variables not derived from structured values are exactly those typed
    under controller.config, and values.yaml gives each its default."""
    structured = _template_keys("configmap-controller.yaml")
    assert {"DB_HOST", "RUNNER_IMAGE", "JOB_DEADLINE_SECONDS"} <= structured
    free = {
        name
        for name in ControllerSettings.model_fields
        if name not in NOT_IN_CONFIGMAP | structured and not name.startswith(LOCAL_ONLY_PREFIX)
    }
    assert sorted(_schema_config_keys("controller") ^ free) == []
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["controller"]["config"]
    assert sorted(set(defaults) ^ free) == []
    env = controller_env(render(set_values=MINIMAL_SET))
    assert sorted(structured - set(env)) == []


@pytest.mark.parametrize("component", ["controller", "runner"])
def test_schema_refuses_a_name_that_is_no_setting(component: str) -> None:
    result = helm(
        "template", "t", str(CHART), "--set", f"{component}.config.MAX_CONCURENT_JOBS=3",
        *values_args(set_values=MINIMAL_SET), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"/{component}/config" in result.stderr and "MAX_CONCURENT_JOBS" in result.stderr


def _documented_settings() -> dict[str, set[str]]:
    """The variables named in the first column of each table under docs/operations.md's
    "## Configuration", by the table's heading."""
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, set[str]] = {}
    heading = ""
    for line in section.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
        elif line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            if first.strip() != "variable":
                tables.setdefault(heading, set()).update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first))
    return tables


def test_operations_tables_list_exactly_the_settings() -> None:
    """docs/operations.md's configuration tables are the settings classes: every variable of
    each program is in its table or the shared one, every variable there is a real setting
    (a removed or misspelt one fails here), and the shared table holds only what both read."""
    tables = _documented_settings()
    assert set(tables) == {"Shared by both programs", "The jobrunner", "The controller"}
    shared = tables["Shared by both programs"]
    controller = set(ControllerSettings.model_fields)
    runner = set(RunnerSettings.model_fields)
    assert sorted(shared - (controller & runner)) == []
    assert sorted(tables["The controller"] ^ (controller - shared)) == []
    assert sorted(tables["The jobrunner"] ^ (runner - shared)) == []


# ------------------------------------------------- least privilege for runners (issue 10) ---

CONNECTED = (
    "database.host=postgres.example.internal",
    "database.user=dharma",
    "webdav.baseUrl=https://dav.example.org/media",
)


def _template_error(*set_values: str) -> str:
    result = helm("template", "t", str(CHART), *values_args(set_values=set_values), check=False)
    assert result.returncode != 0, "rendered, but should have failed"
    return result.stderr


def _runner_policy(manifests: list[Manifest]) -> Manifest:
    return find(manifests, "NetworkPolicy", "-runner")


def test_network_policy_is_on_by_default_and_needs_the_cidrs() -> None:
    """No silent "any address": without the database's and WebDAV's CIDRs the install fails
    and names the value to set, unless the policy is turned off explicitly."""
    error = _template_error(*CONNECTED)
    assert "networkPolicy.databaseCidrs" in error and "networkPolicy.enabled=false" in error
    error = _template_error(*CONNECTED, NETWORK_SET[0])
    assert "networkPolicy.webdav.cidrs" in error
    manifests = render(set_values=[*CONNECTED, "networkPolicy.enabled=false"])
    assert "NetworkPolicy" not in kinds(manifests)


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "postgres"])
def test_schema_refuses_any_address_as_a_cidr(cidr: str) -> None:
    result = helm("template", "t", str(CHART), "--set", f"networkPolicy.databaseCidrs={{{cidr}}}",
                  check=False)  # fmt: skip
    assert result.returncode != 0
    assert "/networkPolicy/databaseCidrs/0" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("url", "extra", "port"),
    [
        ("https://dav.example.org/media", (), 443),
        ("https://dav.example.org:8443/media", (), 8443),
        ("http://dav.example.org/media", ("webdav.allowInsecureHttp=true",), 80),
        ("http://198.51.100.1:8081", ("webdav.allowInsecureHttp=true",), 8081),
    ],
)
def test_runner_egress_is_dns_database_and_webdav_only(
    url: str, extra: tuple[str, ...], port: int
) -> None:
    manifests = render(
        set_values=[*MINIMAL_SET, f"webdav.baseUrl={url}", "database.port=6543", *extra]
    )
    policy = _runner_policy(manifests)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["ingress"] == []
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "jobrunner"
    rules = policy["egress"]
    # Every rule names its destinations: none is open to any address.
    assert all(rule.get("to") for rule in rules), rules
    dns, database, webdav = rules
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert database == {
        "ports": [{"port": 6543, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.20.0.5/32"}}],
    }
    assert webdav == {
        "ports": [{"port": port, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
    }


def test_runner_pods_built_by_the_controller_are_selected_by_the_policy() -> None:
    manifests = render(set_values=MINIMAL_SET)
    settings = controller_settings(manifests)
    job = build_job(
        settings,
        LaunchSpec(job_id=1, attempt=1, media_id="m", memory_limit=None),
        Instance(settings.INSTANCE_NAME, uuid.UUID("5e0c2b9a-0d4f-4f7e-9a51-8c3d2e1f0a6b")),
    )
    labels = job["spec"]["template"]["metadata"]["labels"]
    selector = _runner_policy(manifests)["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()


def test_plain_http_webdav_is_refused_unless_allowed_explicitly() -> None:
    error = _template_error(*MINIMAL_SET, "webdav.baseUrl=http://dav.example.org/media")
    assert "plain http" in error and "webdav.allowInsecureHttp=true" in error
    manifests = render(
        set_values=[*MINIMAL_SET, "webdav.baseUrl=http://dav.example.org/media",
                    "webdav.allowInsecureHttp=true"]
    )  # fmt: skip
    assert runner_env(manifests)["WEBDAV_BASE_URL"] == "http://dav.example.org/media"


def test_database_tls_is_required_by_default() -> None:
    manifests = render(set_values=MINIMAL_SET)
    assert controller_env(manifests)["DB_SSLMODE"] == "require"
    assert runner_env(manifests)["DB_SSLMODE"] == "require"
    migrate = find(manifests, "Job", "-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "DB_SSLMODE", "value": "require"} in migrate["env"]
    relaxed = render(set_values=[*MINIMAL_SET, "database.sslmode=disable"])
    assert runner_env(relaxed)["DB_SSLMODE"] == "disable"


def test_runners_get_their_own_login_and_secret() -> None:
    """runner.database.user and its password: the runners' ConfigMap and Secret carry them;
    the controller and the migrations keep database.user and their own Secret."""
    manifests = render(
        set_values=[*MINIMAL_SET, "runner.database.user=dharma_runner_login",
                    "runner.secret.dbPassword=runner-pw", "secret.dbPassword=controller-pw",
                    "secret.webdavPassword=dav-pw"]
    )  # fmt: skip
    assert runner_env(manifests)["DB_USER"] == "dharma_runner_login"
    assert controller_env(manifests)["DB_USER"] == "dharma"
    settings = controller_settings(manifests)
    assert settings.RUNNER_SECRET_NAME == "t-dharma-stream-runner"
    secrets = secret_values(manifests)
    assert secrets == {
        "t-dharma-stream/DB_PASSWORD": "controller-pw",
        "t-dharma-stream-migrate/DB_PASSWORD": "controller-pw",
        "t-dharma-stream-runner/DB_PASSWORD": "runner-pw",
        "t-dharma-stream-runner/WEBDAV_PASSWORD": "dav-pw",
    }
    # The runners' settings parse, with their login and the secrets from their Secret.
    runner = runner_settings(manifests, DB_PASSWORD="runner-pw", WEBDAV_PASSWORD="dav-pw")
    assert runner.DB_USER == "dharma_runner_login"


def test_runners_existing_secret_is_referenced_and_not_created() -> None:
    manifests = render(
        set_values=[*MINIMAL_SET, "secret.existingSecret=controller-credentials",
                    "runner.database.user=dharma_runner_login",
                    "runner.secret.existingSecret=runner-credentials"]
    )  # fmt: skip
    assert "Secret" not in kinds(manifests)
    assert controller_settings(manifests).RUNNER_SECRET_NAME == "runner-credentials"


def test_a_runner_login_without_its_secret_is_refused() -> None:
    error = _template_error(
        *MINIMAL_SET, "secret.existingSecret=controller-credentials",
        "runner.database.user=dharma_runner_login",
    )  # fmt: skip
    assert "runner.secret.existingSecret" in error


def test_notes_say_when_runners_share_the_controllers_login() -> None:
    def notes(*extra: str) -> str:
        result = helm("install", "t", str(CHART), "--dry-run=client",
                      *values_args(set_values=[*MINIMAL_SET, *extra]))  # fmt: skip
        return result.stdout.partition("NOTES:")[2]

    assert "IN ROLE dharma_runner" in notes()
    assert "IN ROLE dharma_runner" not in notes("runner.database.user=r")
    assert 'Pod Security "restricted"' in notes()


# ------------------------------------------------------------ models (issue 12, item 3) ---

SMALL = {"file": "volume/ggml-small.bin", "sha256": "1" * 64, "memory": "3Gi"}


def _models_job(manifests: list[Manifest], model: str | None) -> Manifest:
    settings = controller_settings(manifests)
    spec = LaunchSpec(7, 1, "0b6f9c1e-8f43-4d1e-9a55-0d7b7c1f2a10", None, model)
    return build_job(settings, spec, Instance(settings.INSTANCE_NAME, uuid.uuid4()))


@pytest.mark.parametrize(
    ("values", "volume"),
    [(["models.persistentVolumeClaim.claimName=whisper-models"],
      {"persistentVolumeClaim": {"claimName": "whisper-models", "readOnly": True}}),
     (["models.image.reference=registry.example.org/whisper-models:v3",
       "models.image.pullPolicy=Always"],
      {"image": {"reference": "registry.example.org/whisper-models:v3",
                 "pullPolicy": "Always"}})],
    ids=["pvc", "image"],
)  # fmt: skip
def test_models_volume_reaches_the_runner_pods_read_only(
    values: list[str], volume: dict[str, Any]
) -> None:
    """The chart's models values become RUNNER_MODELS_VOLUME and the catalog WHISPER_MODELS
    of both programs; the Job the controller builds from them mounts the volume read-only at
    /models/volume and sizes a job naming `small` by the catalog's memory."""
    catalog = {"base": default_catalog()["base"].model_dump(exclude_none=True), "small": SMALL}
    manifests = render(set_values=[*MINIMAL_SET, *values,
                                   f"models.catalog.small.file={SMALL['file']}",
                                   f"models.catalog.small.sha256={SMALL['sha256']}",
                                   f"models.catalog.small.memory={SMALL['memory']}"])  # fmt: skip
    assert json.loads(controller_env(manifests)["WHISPER_MODELS"]) == catalog
    assert json.loads(runner_env(manifests)["WHISPER_MODELS"]) == catalog
    runner, controller = runner_settings(manifests), controller_settings(manifests)
    assert runner.WHISPER_MODELS == controller.WHISPER_MODELS
    pod = _models_job(manifests, "small")["spec"]["template"]["spec"]
    assert pod["volumes"][1] == {"name": "models", **volume}
    container = pod["containers"][0]
    assert {"name": "models", "mountPath": "/models/volume", "readOnly": True} in (
        container["volumeMounts"]
    )
    assert {"name": "WHISPER_MODEL", "value": "small"} in container["env"]
    assert container["resources"]["limits"]["memory"] == "3Gi"


def test_no_models_volume_by_default() -> None:
    pod = _models_job(render(set_values=MINIMAL_SET), None)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["scratch"]


def test_two_models_volumes_are_refused() -> None:
    error = _template_error(*MINIMAL_SET, "models.persistentVolumeClaim.claimName=m",
                            "models.image.reference=r/m:1")  # fmt: skip
    assert "not both" in error


@pytest.mark.parametrize(
    "setting",
    ["models.catalog.x.file=../etc/passwd", "models.catalog.base.sha256=abc",
     "models.catalog.base.memory=500m", "models.persistentVolumeClaim.claimName=Bad_Name",
     "models.image.pullPolicy=Sometimes"],
)  # fmt: skip
def test_schema_refuses_bad_models_values(setting: str) -> None:
    result = helm("template", "t", str(CHART), "--set", setting,
                  *values_args(set_values=MINIMAL_SET), check=False)  # fmt: skip
    assert result.returncode != 0
    assert "/models" in result.stderr
