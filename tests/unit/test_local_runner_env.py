"""The local executor gives runner processes the runners' own database login when one is
configured, never the controller's password (issue 10, least privilege)."""

from __future__ import annotations

from controller.local import runner_environment
from controller.settings import ControllerSettings
from dharma_common.settings import load_settings

CONTROLLER_ENV = {
    "DB_HOST": "db", "DB_USER": "dharma", "DB_PASSWORD": "controller-secret",
    "WEBDAV_PASSWORD": "dav", "EXECUTOR": "local",
}  # fmt: skip


def _settings(**extra: str) -> ControllerSettings:
    return load_settings(ControllerSettings, **CONTROLLER_ENV, **extra)


def test_runner_login_replaces_the_controllers() -> None:
    extra = {"LOCAL_RUNNER_DB_USER": "runner_login", "LOCAL_RUNNER_DB_PASSWORD": "runner-secret"}
    env = runner_environment(_settings(**extra), {**CONTROLLER_ENV, **extra})
    assert env["DB_USER"] == "runner_login"
    assert env["DB_PASSWORD"] == "runner-secret"
    assert "controller-secret" not in env.values()
    assert not [k for k in env if k.startswith("LOCAL_RUNNER_DB_")]
    assert env["WEBDAV_PASSWORD"] == "dav"


def test_without_a_runner_login_runners_share_the_controllers() -> None:
    env = runner_environment(_settings(), CONTROLLER_ENV)
    assert env == CONTROLLER_ENV
