"""`dharma-controller`: `migrate` the schema, `run` the service, or manage `jobs`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from controller.jobs_cli import add_jobs_parser, run_jobs
from dharma_common.logs import configure_logging
from dharma_common.settings import ConfigError, DatabaseSettings, load_settings

log = logging.getLogger("controller")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dharma-controller",
        description="Dharma Stream batch controller. Configuration comes from the environment "
        "(DB_HOST, DB_USER, ...; see docs/operations.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the dharma schema (idempotent)")
    run = sub.add_parser(
        "run",
        help="run the service: claim pending jobs, launch one runner per attempt, record outcomes",
    )
    run.add_argument(
        "--executor", choices=("kubernetes", "local"), default=None,
        help="where attempts run (default: EXECUTOR, which defaults to kubernetes)",
    )  # fmt: skip
    run.add_argument(
        "--exit-when-idle", action="store_true",
        help="exit 0 once the queue is drained: no pending row (retries waiting for their "
        "backoff included) and nothing in flight (demo, scripts, tests)",
    )  # fmt: skip
    add_jobs_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "migrate":
        import psycopg2

        from controller.migrate import migrate

        try:
            db = load_settings(DatabaseSettings)
            applied = migrate(db)
        except ConfigError as exc:
            log.error("configuration error: %s", exc, extra={"action": "config_error"})
            print(f"dharma-controller: configuration error: {exc}", file=sys.stderr)
            return 2
        except psycopg2.Error as exc:
            print(f"dharma-controller: migration failed on {db.describe()}: {exc}", file=sys.stderr)
            return 1
        print(f"schema up to date ({len(applied)} migration(s) applied)")
        return 0
    if args.command == "run":
        from controller.run import run_service

        return run_service(args.executor, args.exit_when_idle)
    if args.command == "jobs":
        return run_jobs(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
