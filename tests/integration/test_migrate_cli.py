"""`dharma-controller migrate` as operators run it: a real process, real PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from devtools.log_actions import lines_with_action
from devtools.services import PostgresServer

pytestmark = pytest.mark.integration


def _migrate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", "migrate"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_migrate_creates_the_schema_once_and_is_idempotent(pg_server: PostgresServer) -> None:
    with contextlib.closing(pg_server.admin()) as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE migrate_cli")
    settings = pg_server.settings("migrate_cli")
    env = {
        **os.environ, "DB_HOST": settings.DB_HOST, "DB_PORT": str(settings.DB_PORT),
        "DB_NAME": "migrate_cli", "DB_USER": settings.DB_USER,
        "DB_PASSWORD": settings.DB_PASSWORD.get_secret_value(), "LOG_LEVEL": "DEBUG",
    }  # fmt: skip
    first = _migrate(env)
    assert first.returncode == 0, first.stderr
    assert lines_with_action(first.stderr, "migration_applied"), first.stderr
    assert "migration(s) applied" in first.stdout
    second = _migrate(env)
    assert second.returncode == 0, second.stderr
    assert "(0 migration(s) applied)" in second.stdout
    assert settings.DB_PASSWORD.get_secret_value() not in first.stderr + second.stderr


def test_migrate_names_the_missing_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    result = _migrate(env)
    assert result.returncode == 2
    assert "DB_HOST is required but not set" in result.stderr
