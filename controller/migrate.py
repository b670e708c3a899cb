"""Apply the versioned schema migrations in `controller/migrations/`.

Each file `NNNN_name.sql` runs once, in its own transaction, recorded in
`dharma.schema_migrations`. A transaction-scoped advisory lock serialises concurrent runs (a
Helm hook and a controller starting together), so `migrate` is safe to run any number of
times from any number of places.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg2

from dharma_common.settings import DatabaseSettings

log = logging.getLogger(__name__)

#: Arbitrary constant: "dharma migrations" for pg_advisory_xact_lock.
_LOCK_KEY = 0x6468_6D69
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations shipped in the package, in version order."""
    found = []
    for entry in resources.files("controller.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def migrate(db: DatabaseSettings) -> list[Migration]:
    """Bring the schema up to date; returns the migrations applied by this call."""
    applied: list[Migration] = []
    conn = psycopg2.connect(**db.connect_kwargs("dharma-migrate"))
    try:
        for migration in available_migrations():
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur.execute("CREATE SCHEMA IF NOT EXISTS dharma")
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS dharma.schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur.execute(
                    "SELECT 1 FROM dharma.schema_migrations WHERE version = %s",
                    (migration.version,),
                )
                if cur.fetchone():
                    continue
                cur.execute(migration.sql)
                cur.execute(
                    "INSERT INTO dharma.schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied.append(migration)
                log.info(
                    "migration applied",
                    extra={
                        "action": "migration_applied",
                        "version": migration.version,
                        "migration": migration.name,
                    },
                )
    finally:
        conn.close()
    return applied
