"""Controller settings fail fast naming the variable; memory quantities; the CLI's exit code
for bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.quantity import format_bytes, parse_bytes, scale_memory
from controller.settings import ControllerSettings
from dharma_common.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"MAX_CONCURRENT_JOBS": 0}, "MAX_CONCURRENT_JOBS"),
        ({"EXECUTOR": "docker"}, "EXECUTOR"),
        ({"RUNNER_MEMORY_LIMIT": "lots"}, "RUNNER_MEMORY_LIMIT"),
        ({"POLL_INTERVAL_SECONDS": 0}, "POLL_INTERVAL_SECONDS"),
        ({"RUNNER_NODE_SELECTOR": "{not json"}, "RUNNER_NODE_SELECTOR"),
        ({"NAMESPACE": "Bad_Name"}, "NAMESPACE"),
        ({"RUNNER_IMAGE": "has space"}, "RUNNER_IMAGE"),
        ({"LAUNCH_CONCURRENCY": 0}, "LAUNCH_CONCURRENCY"),
        # A valid Kubernetes quantity ("m" = milli) but not a memory size: rejected by
        # parse_bytes at every launch before, so each attempt hung until the pending timeout.
        ({"RUNNER_MEMORY_LIMIT": "500m"}, "RUNNER_MEMORY_LIMIT='500m' is invalid: .*memory"),
        ({"RUNNER_MEMORY_REQUEST": "500m"}, "RUNNER_MEMORY_REQUEST"),
        ({"RUNNER_MEMORY_LIMIT_MAX": "1.5m"}, "RUNNER_MEMORY_LIMIT_MAX"),
        ({"RUNNER_SCRATCH_SIZE": "100m"}, "RUNNER_SCRATCH_SIZE"),
        (
            {"RUNNER_MEMORY_REQUEST": "3Gi"},
            "RUNNER_MEMORY_LIMIT='2Gi' is invalid: .*below RUNNER_MEMORY_REQUEST \\(3Gi\\)",
        ),
        (
            {"RUNNER_MEMORY_LIMIT": "16Gi"},
            "RUNNER_MEMORY_LIMIT_MAX='8Gi' is invalid: .*below RUNNER_MEMORY_LIMIT \\(16Gi\\)",
        ),
    ],
)
def test_bad_values_name_the_variable(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", **overrides)


def test_memory_settings_in_order_are_accepted() -> None:
    loaded = load_settings(
        ControllerSettings, DB_HOST="db", DB_USER="u", RUNNER_MEMORY_REQUEST="2Gi",
        RUNNER_MEMORY_LIMIT="2048Mi", RUNNER_MEMORY_LIMIT_MAX="2Gi", RUNNER_SCRATCH_SIZE="1.5G",
    )  # fmt: skip
    assert loaded.RUNNER_MEMORY_LIMIT == "2048Mi"


def test_local_executor_has_a_limit_but_no_request() -> None:
    """The local executor limits a runner with RUNNER_MEMORY_LIMIT (0: none) and raises it
    after an OOM kill up to RUNNER_MEMORY_LIMIT_MAX; there is no request to be above."""
    loaded = load_settings(
        ControllerSettings, DB_HOST="db", DB_USER="u", EXECUTOR="local",
        RUNNER_MEMORY_LIMIT="40Mi", RUNNER_MEMORY_LIMIT_MAX="40Mi",
    )  # fmt: skip
    assert loaded.RUNNER_MEMORY_LIMIT == "40Mi"
    assert (
        load_settings(
            ControllerSettings, DB_HOST="db", DB_USER="u", EXECUTOR="local", RUNNER_MEMORY_LIMIT="0"
        ).RUNNER_MEMORY_LIMIT
        == "0"
    )
    with pytest.raises(ConfigError, match=r"RUNNER_MEMORY_LIMIT_MAX='40Mi' is invalid: .*below"):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", EXECUTOR="local",
                      RUNNER_MEMORY_LIMIT_MAX="40Mi")  # fmt: skip
    with pytest.raises(ConfigError, match="RUNNER_MEMORY_LIMIT_MAX"):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", EXECUTOR="local",
                      RUNNER_MEMORY_LIMIT_MAX="40m")  # fmt: skip


def test_a_removed_variable_is_refused_naming_its_replacement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LOCAL_MEMORY_LIMIT_BYTES became RUNNER_MEMORY_LIMIT: ignoring the old name (as unknown
    variables are) would silently change the limit, so start-up fails and says what to set."""
    monkeypatch.setenv("LOCAL_MEMORY_LIMIT_BYTES", "41943040")
    with pytest.raises(
        ConfigError, match=r"LOCAL_MEMORY_LIMIT_BYTES was removed: .*RUNNER_MEMORY_LIMIT"
    ):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", EXECUTOR="local")


@pytest.mark.parametrize(
    ("value", "complaint"),
    [("regcred,other", "must be JSON .*registry-credentials"), ('["Not_A_Name"]', "Secret name")],
)
def test_pull_secrets_are_a_json_list_of_names(value: str, complaint: str) -> None:
    """Every list or map setting is JSON: a comma-separated list fails at start-up."""
    loaded = load_settings(
        ControllerSettings, DB_HOST="db", DB_USER="u", RUNNER_IMAGE_PULL_SECRETS='["a", "b-c"]'
    )
    assert loaded.RUNNER_IMAGE_PULL_SECRETS == ["a", "b-c"]
    with pytest.raises(
        ConfigError, match=rf"RUNNER_IMAGE_PULL_SECRETS=.* is invalid: .*{complaint}"
    ):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u",
                      RUNNER_IMAGE_PULL_SECRETS=value)  # fmt: skip


def test_identity_defaults_to_the_host_name() -> None:
    assert (
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u", POD_NAME="pod-1").identity()
        == "pod-1"
    )
    assert load_settings(ControllerSettings, DB_HOST="db", DB_USER="u").identity()


def test_cli_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "DB_HOST": "db", "DB_USER": "u",
           "MAX_CONCURRENT_JOBS": "-3", "HOME": str(tmp_path)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "controller", "run", "--executor", "local"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "MAX_CONCURRENT_JOBS" in result.stderr


def test_cli_without_kubeconfig_says_so(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "DB_HOST": "db", "DB_USER": "u",
           "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "controller", "run", "--executor", "kubernetes"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "KUBECONFIG" in result.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("1.5Gi", 3 * 2**29), ("1G", 10**9),
     ("100", 100), ("64k", 64000)],
)  # fmt: skip
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_quantity_round_trip_and_scaling() -> None:
    assert format_bytes(4 * 2**30) == "4Gi"
    assert format_bytes(1536 * 2**20) == "1536Mi"
    assert format_bytes(1000) == "1000"
    assert scale_memory("2Gi", 2.0, "8Gi") == "4Gi"
    assert scale_memory("6Gi", 2.0, "8Gi") == "8Gi"
    assert scale_memory("40Mi", 1.5, "8Gi") == "60Mi"
    with pytest.raises(ValueError, match="memory quantity"):
        parse_bytes("two gigs")


def test_json_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the Helm chart renders them: JSON strings, and empty strings for "none"."""
    monkeypatch.setenv("RUNNER_NODE_SELECTOR", '{"pool": "media"}')
    monkeypatch.setenv("RUNNER_TOLERATIONS", "")
    monkeypatch.setenv("RUNNER_POD_ANNOTATIONS", "")
    loaded = load_settings(ControllerSettings, DB_HOST="db", DB_USER="u")
    assert loaded.RUNNER_NODE_SELECTOR == {"pool": "media"}
    assert loaded.RUNNER_TOLERATIONS == [] and loaded.RUNNER_POD_ANNOTATIONS == {}
    monkeypatch.setenv("RUNNER_AFFINITY", "{not json")
    with pytest.raises(ConfigError, match="RUNNER_AFFINITY"):
        load_settings(ControllerSettings, DB_HOST="db", DB_USER="u")
