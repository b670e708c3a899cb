"""The chart against a real API server (the testbed, or any cluster via DHARMA_TEST_KUBECONFIG).

Why: `helm template` proves the chart renders; only the API server proves the objects are
valid (server-side dry run with strict field validation), that the Role really lets the
controller work while keeping Secrets out of reach (a token of the chart's own
ServiceAccount, used by the controller's own executor and lease code), and that the Job the
controller builds from the chart's values is admitted under the `restricted` Pod Security
Standard.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from controller.jobspec import Instance, LaunchSpec, build_job, job_name
from controller.kube import KubernetesExecutor
from controller.lease import LeaseElector
from controller.model import RunnerKey
from controller.settings import ControllerSettings
from dharma_common.settings import load_settings
from tests.deploy.chart import (
    CHART,
    FULL_VALUES,
    KIND_MANIFESTS,
    MINIMAL_SET,
    Manifest,
    controller_settings,
    helm,
    render,
    values_args,
)
from tests.testbed import E2E_LABEL, Kube, wait_until

pytestmark = pytest.mark.e2e

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
SERVICE_MONITOR_CRD = Path(__file__).with_name("servicemonitor-crd.yaml")
RELEASE = "dharma"


def _post(
    api: client.ApiClient, path: str, body: Manifest, *, dry_run: bool
) -> tuple[int, dict[str, Any]]:
    """POST a manifest, with strict field validation (unknown or duplicate fields are errors,
    not warnings). Returns the status and the decoded answer."""
    query = [("fieldValidation", "Strict")]
    if dry_run:
        query.append(("dryRun", "All"))
    request = api.param_serialize(
        "POST",
        path,
        query_params=query,
        header_params={"Content-Type": "application/json", "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*request)
    response.read()  # type: ignore[no-untyped-call]
    return response.status, json.loads(response.data or b"{}")


def _dry_run_all(kube: Kube, manifests: list[Manifest], namespace: str) -> dict[str, str]:
    """Every manifest through the API server's admission and validation; failures by name."""
    dynamic = DynamicClient(kube.api_client)  # type: ignore[no-untyped-call]
    failures = {}
    for manifest in manifests:
        resource = dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        path = resource.path(namespace=namespace if resource.namespaced else None)
        status, answer = _post(kube.api_client, path, manifest, dry_run=True)
        if status >= 300:
            failures[f"{manifest['kind']}/{manifest['metadata']['name']}"] = answer.get(
                "message", str(answer)
            )
    return failures


def _ensure_service_monitor_crd(kube: Kube) -> None:
    """A minimal ServiceMonitor CRD (the Prometheus Operator's API group and kind), so the
    fully-loaded values can be checked too. Cluster-scoped, created once, left in place."""
    ext = client.ApiextensionsV1Api(kube.api_client)
    crd = yaml.safe_load(SERVICE_MONITOR_CRD.read_text())
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:
            raise

    def established() -> bool:
        current = ext.read_custom_resource_definition(crd["metadata"]["name"])
        conditions = (current.status.conditions if current.status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_until(established, what="the ServiceMonitor CRD to be established")


@pytest.mark.parametrize("values", [(), (FULL_VALUES,)], ids=["default", "full"])
def test_every_rendered_manifest_passes_server_side_dry_run(
    kube: Kube, kube_namespace: str, values: tuple[Path, ...]
) -> None:
    if values:
        _ensure_service_monitor_crd(kube)
    manifests = render(values, MINIMAL_SET, namespace=kube_namespace)
    assert _dry_run_all(kube, manifests, kube_namespace) == {}


def test_kind_manifests_pass_server_side_dry_run(kube: Kube, kube_namespace: str) -> None:
    manifests = [
        doc
        for path in sorted(KIND_MANIFESTS.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert manifests
    assert _dry_run_all(kube, manifests, kube_namespace) == {}


# --------------------------------------------------------------------------- helm install ---


@dataclass
class Release:
    namespace: str
    name: str


@pytest.fixture(scope="module")
def release(kube: Kube) -> Iterator[Release]:
    """The chart installed with `helm install` into a namespace that enforces the
    restricted Pod Security Standard (so every pod the chart makes is checked too)."""
    core = client.CoreV1Api(kube.api_client)
    namespace = f"e2e-chart-{uuid.uuid4().hex[:6]}"
    labels = {E2E_LABEL: "true", **RESTRICTED}
    core.create_namespace(
        client.V1Namespace.model_validate({"metadata": {"name": namespace, "labels": labels}})
    )

    def has_default_sa() -> bool:
        accounts = core.list_namespaced_service_account(namespace).items
        return any(sa.metadata and sa.metadata.name == "default" for sa in accounts)

    wait_until(has_default_sa, what=f"ServiceAccount {namespace}/default")
    # The migration hook Job succeeds on the testbed (KWOK); a real cluster has no database
    # at this fake address, so there the chart is installed without the hook and not waited on.
    extra = ["--wait", "--timeout", "5m"] if kube.is_testbed else ["--set", "migrations.mode=none"]
    passwords = ["secret.dbPassword=e2e-db-password", "secret.webdavPassword=e2e-dav-password"]
    try:
        helm(
            "install", RELEASE, str(CHART), "--namespace", namespace,
            *values_args(set_values=[*MINIMAL_SET, *passwords]), *extra,
            kubeconfig=kube.kubeconfig,
        )  # fmt: skip
        yield Release(namespace, RELEASE)
    finally:
        helm("uninstall", RELEASE, "--namespace", namespace, kubeconfig=kube.kubeconfig,
             check=False)  # fmt: skip
        core.delete_namespace(namespace)
        kube._deleted_namespaces.append(namespace)


def test_install_makes_the_controller_available(kube: Kube, release: Release) -> None:
    if not kube.is_testbed:
        pytest.skip("the controller needs a real database to become ready outside the testbed")
    apps = client.AppsV1Api(kube.api_client)
    name = f"{release.name}-dharma-stream-controller"

    def available() -> bool:
        deployment = apps.read_namespaced_deployment(name, release.namespace)
        status = deployment.status
        return bool(status and status.available_replicas == deployment.spec.replicas)

    wait_until(available, what=f"Deployment {name} to be available", timeout=120)
    pods = client.CoreV1Api(kube.api_client).list_namespaced_pod(
        release.namespace, label_selector="app.kubernetes.io/component=controller"
    )
    assert [p.spec.service_account_name for p in pods.items if p.spec] == [name]


def test_upgrade_reruns_migrations_and_rolls_the_controller(kube: Kube, release: Release) -> None:
    """`helm upgrade` with a changed setting: the pre-upgrade migration hook runs and cleans
    up after itself (Job and its transient password Secret), and the controller pods roll
    because their ConfigMap changed."""
    if not kube.is_testbed:
        pytest.skip("the migration hook needs a real database outside the testbed")
    apps = client.AppsV1Api(kube.api_client)
    core = client.CoreV1Api(kube.api_client)
    name = _controller_name(release)

    def template_checksum() -> str:
        template = apps.read_namespaced_deployment(name, release.namespace).spec
        assert template is not None and template.template.metadata is not None
        annotations = template.template.metadata.annotations or {}
        return annotations["checksum/config"]

    before = template_checksum()
    helm(
        "upgrade", release.name, str(CHART), "--namespace", release.namespace,
        "--reuse-values", "--set", "controller.config.MAX_CONCURRENT_JOBS=9",
        "--wait", "--timeout", "5m", kubeconfig=kube.kubeconfig,
    )  # fmt: skip
    assert template_checksum() != before
    config_map = core.read_namespaced_config_map(name, release.namespace)
    assert (config_map.data or {})["MAX_CONCURRENT_JOBS"] == "9"
    history = helm(
        "history", release.name, "--namespace", release.namespace, "-o", "json",
        kubeconfig=kube.kubeconfig,
    )  # fmt: skip
    assert [r["status"] for r in json.loads(history.stdout)] == ["superseded", "deployed"]
    leftovers = [
        s.metadata.name
        for s in core.list_namespaced_secret(release.namespace).items
        if s.metadata and s.metadata.name and s.metadata.name.endswith("-migrate")
    ]
    assert leftovers == []
    jobs = client.BatchV1Api(kube.api_client).list_namespaced_job(
        release.namespace, label_selector="app.kubernetes.io/component=migrate"
    )
    assert jobs.items == []


def _service_account_client(kube: Kube, namespace: str, name: str) -> client.ApiClient:
    """An API client authenticated only by a fresh token of that ServiceAccount."""
    core = client.CoreV1Api(kube.api_client)
    answer = core.create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest.model_validate({"spec": {"expirationSeconds": 900}}),
    )
    assert answer.status is not None and answer.status.token
    token = answer.status.token
    admin = kube.api_client.configuration
    configuration = client.Configuration(host=admin.host)
    configuration.ssl_ca_cert = admin.ssl_ca_cert
    configuration.verify_ssl = admin.verify_ssl
    configuration.api_key = {"BearerToken": token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(configuration)


def _can(api: client.ApiClient, namespace: str, verb: str, resource: str, group: str = "",
         subresource: str = "", name: str = "") -> bool:  # fmt: skip
    attributes = {
        "namespace": namespace, "verb": verb, "group": group,
        "resource": resource, "subresource": subresource, "name": name,
    }  # fmt: skip
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview.model_validate(
            {"spec": {"resourceAttributes": attributes}}
        )
    )
    return bool(review.status and review.status.allowed)


def _controller_name(release: Release) -> str:
    return f"{release.name}-dharma-stream-controller"


def _installed_settings(kube: Kube, release: Release) -> ControllerSettings:
    """The settings a controller pod of this release gets (its ConfigMap, as installed)."""
    config_map = client.CoreV1Api(kube.api_client).read_namespaced_config_map(
        f"{release.name}-dharma-stream-controller", release.namespace
    )
    return load_settings(ControllerSettings, **(config_map.data or {}), POD_NAME="rbac-check")


def test_service_account_can_do_the_controllers_whole_job(kube: Kube, release: Release) -> None:
    """The controller's own executor and lease code, authenticated as the chart's
    ServiceAccount: create, watch, observe and delete a runner Job; take and release the
    Lease."""
    settings = _installed_settings(kube, release)
    sa_api = _service_account_client(kube, release.namespace, _controller_name(release))
    instance = Instance(settings.INSTANCE_NAME, uuid.uuid4())
    executor = KubernetesExecutor(settings, sa_api, instance=instance)
    executor.start(lambda: None)
    try:
        wait_until(executor.synced, what="the executor's Job and pod caches to sync")
        spec = LaunchSpec(job_id=4242, attempt=1, media_id=str(uuid.uuid4()), memory_limit=None)
        [launched] = executor.launch([spec])
        assert launched.error is None, launched.error
        runner_name = job_name(settings, instance, 4242, 1)
        assert launched.runner_name == runner_name
        wait_until(lambda: executor.jobs.get(runner_name), what="the Job in the watch cache")
        wait_until(executor.pods.items, what="the runner pod in the watch cache")
        executor.delete(RunnerKey(4242, 1))
        batch = client.BatchV1Api(kube.api_client)

        def gone() -> bool:
            try:
                batch.read_namespaced_job(runner_name, release.namespace)
            except ApiException as exc:
                return bool(exc.status == 404)
            return False

        wait_until(gone, what="the runner Job to be deleted")
    finally:
        executor.shutdown()

    elector = LeaseElector(settings, sa_api)
    elector.start(lambda: None)
    try:
        wait_until(elector.is_leader, what="the Lease to be acquired")
    finally:
        elector.stop()
    lease = client.CoordinationV1Api(kube.api_client).read_namespaced_lease(
        settings.LEASE_NAME, release.namespace
    )
    assert lease.metadata is not None
    assert lease.metadata.name == settings.LEASE_NAME


def test_service_account_cannot_read_secrets(kube: Kube, release: Release) -> None:
    sa_api = _service_account_client(kube, release.namespace, _controller_name(release))
    core = client.CoreV1Api(sa_api)
    secret = f"{release.name}-dharma-stream"
    with pytest.raises(ApiException) as read:
        core.read_namespaced_secret(secret, release.namespace)
    assert read.value.status == 403
    with pytest.raises(ApiException) as listed:
        core.list_namespaced_secret(release.namespace)
    assert listed.value.status == 403
    ns = release.namespace
    for verb in ("get", "list", "watch"):
        assert not _can(sa_api, ns, verb, "secrets")
    assert not _can(sa_api, ns, "create", "pods")
    assert not _can(sa_api, ns, "create", "pods", subresource="exec")
    assert not _can(sa_api, ns, "update", "configmaps")
    assert not _can(sa_api, "default", "create", "jobs", group="batch")
    for verb in ("create", "get", "list", "watch", "delete"):
        assert _can(sa_api, ns, verb, "jobs", group="batch")
    for verb in ("get", "list", "watch"):
        assert _can(sa_api, ns, verb, "pods")
    assert not _can(sa_api, ns, "update", "leases", group="coordination.k8s.io", name="other")


# ------------------------------------------------------------------- Pod Security Standard ---


def _runner_job(namespace: str) -> Manifest:
    settings = controller_settings(render(set_values=MINIMAL_SET, namespace=namespace))
    spec = LaunchSpec(job_id=77, attempt=2, media_id=str(uuid.uuid4()), memory_limit=None)
    return build_job(settings, spec, Instance(settings.INSTANCE_NAME, uuid.uuid4()))


def _bare_pod(job: Manifest, name: str) -> Manifest:
    template = job["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
        "spec": copy.deepcopy(template["spec"]),
    }


def test_runner_job_is_admitted_under_the_restricted_pod_security_standard(
    kube: Kube, kube_namespace: str
) -> None:
    core = client.CoreV1Api(kube.api_client)
    core.patch_namespace(kube_namespace, {"metadata": {"labels": RESTRICTED}})
    job = _runner_job(kube_namespace)
    pods_path = f"/api/v1/namespaces/{kube_namespace}/pods"

    # The pod template as a pod: admitted (PodSecurity judges pods, not Jobs).
    status, answer = _post(kube.api_client, pods_path, _bare_pod(job, "pss-check"), dry_run=True)
    assert status == 201, answer

    # The Job itself: its controller's pod creation goes through the same admission.
    status, answer = _post(
        kube.api_client, f"/apis/batch/v1/namespaces/{kube_namespace}/jobs", job, dry_run=False
    )
    assert status == 201, answer
    name = job["metadata"]["name"]
    wait_until(
        lambda: core.list_namespaced_pod(kube_namespace, label_selector=f"job-name={name}").items,
        what=f"the Job controller to create a pod for {name}",
    )

    # The check has teeth: the same pod with privilege escalation allowed is rejected.
    bad = _bare_pod(job, "pss-violation")
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del bad["spec"]["securityContext"]["seccompProfile"]
    del bad["spec"]["containers"][0]["securityContext"]["seccompProfile"]
    status, answer = _post(kube.api_client, pods_path, bad, dry_run=True)
    assert status == 403, answer
    assert 'violates PodSecurity "restricted:latest"' in answer["message"]
    assert "allowPrivilegeEscalation" in answer["message"]
    assert "seccompProfile" in answer["message"]
