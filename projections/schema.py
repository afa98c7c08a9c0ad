"""Tables of the display views, on SQLite and PostgreSQL alike.

Each view owns a set of tables. ``create_tables`` can create them under a
suffix (``view_results_r1f2e``): a rebuild fills fresh tables beside the live
ones and renames them into place in one transaction. Index names carry a
random token so renamed tables never clash with the next rebuild's indexes.

Text keys use the "C" collation on PostgreSQL: keyset pagination compares
UUID strings and ISO timestamps byte by byte, whatever the server's locale.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from projections.sqlstore import Cursor


@dataclass(frozen=True)
class Table:
    name: str
    columns: str  # column definitions; {C} marks a key collation
    indexes: tuple[str, ...] = ()  # column lists


TRACKING_DDL = (
    "CREATE TABLE IF NOT EXISTS projection_tracking ("
    " view TEXT PRIMARY KEY,"
    " position BIGINT NOT NULL,"
    " state TEXT NOT NULL,"
    " last_error TEXT,"
    " error_position BIGINT,"
    " updated_at TEXT NOT NULL)"
)

DISPLAY_TABLES: tuple[Table, ...] = (
    Table(
        "view_teams",
        "team_id TEXT{C} PRIMARY KEY, name TEXT NOT NULL, external_id TEXT NOT NULL,"
        " created_at TEXT{C} NOT NULL",
        ("created_at, team_id",),
    ),
    Table(
        "view_accounts",
        "account_id TEXT{C} PRIMARY KEY, team_id TEXT{C} NOT NULL, role_arn TEXT NOT NULL,"
        " aws_account_id TEXT NOT NULL, method TEXT NOT NULL, verified INTEGER NOT NULL,"
        " linked INTEGER NOT NULL, linked_at TEXT{C} NOT NULL, unlinked_at TEXT,"
        " linked_by TEXT NOT NULL DEFAULT '', profile TEXT,"
        " access TEXT NOT NULL DEFAULT 'ok', access_reason TEXT, access_changed_at TEXT",
        ("team_id, linked_at, account_id",),
    ),
    Table(
        "view_plans",
        "plan_id TEXT{C} PRIMARY KEY, team_id TEXT{C} NOT NULL, account_id TEXT{C} NOT NULL,"
        " name TEXT NOT NULL, created_at TEXT{C} NOT NULL,"
        " backup_excluded INTEGER NOT NULL DEFAULT 0, latest_run_id TEXT",
        ("team_id, created_at, plan_id",),
    ),
    Table(
        "view_runs",
        "run_id TEXT{C} PRIMARY KEY, team_id TEXT{C} NOT NULL, plan_id TEXT{C} NOT NULL,"
        " status TEXT NOT NULL, started_at TEXT{C} NOT NULL, finished_at TEXT, error TEXT,"
        " total BIGINT NOT NULL DEFAULT 0,"
        " sev_critical BIGINT NOT NULL DEFAULT 0, sev_high BIGINT NOT NULL DEFAULT 0,"
        " sev_medium BIGINT NOT NULL DEFAULT 0, sev_low BIGINT NOT NULL DEFAULT 0,"
        " sev_informational BIGINT NOT NULL DEFAULT 0,"
        " st_fail BIGINT NOT NULL DEFAULT 0, st_pass BIGINT NOT NULL DEFAULT 0,"
        " st_error BIGINT NOT NULL DEFAULT 0, st_skipped BIGINT NOT NULL DEFAULT 0",
        ("plan_id, started_at, run_id", "team_id, started_at"),
    ),
    Table(
        "view_results",
        "run_id TEXT{C} NOT NULL, seq BIGINT NOT NULL, team_id TEXT{C} NOT NULL,"
        " plan_id TEXT{C} NOT NULL, rule_id TEXT NOT NULL, title TEXT NOT NULL,"
        " severity TEXT{C} NOT NULL, status TEXT{C} NOT NULL, resource_arn TEXT NOT NULL,"
        " region TEXT NOT NULL, message TEXT NOT NULL, observed_at TEXT NOT NULL,"
        " details TEXT, PRIMARY KEY (run_id, seq)",
        # Pages of one run, filtered by severity or status. Purges delete by
        # run (the primary key's prefix), so no index on team or plan is needed.
        ("run_id, severity, seq", "run_id, status, seq"),
    ),
)

EXCLUSION_TABLES: tuple[Table, ...] = (
    Table(
        "view_exclusions",
        "plan_id TEXT{C} PRIMARY KEY, team_id TEXT{C} NOT NULL, reason TEXT NOT NULL,"
        " ticket TEXT, requested_by TEXT NOT NULL, requested_at TEXT{C} NOT NULL,"
        " position BIGINT NOT NULL",
        ("team_id, requested_at, plan_id", "requested_at, plan_id"),
    ),
)


def ddl(table: Table, dialect: str, suffix: str = "", *, indexes: bool = True) -> list[str]:
    """CREATE statements for a table and (unless told otherwise) its indexes."""
    collate = ' COLLATE "C"' if dialect == "postgresql" else ""
    statements = [f"CREATE TABLE {table.name}{suffix} ({table.columns.format(C=collate)})"]
    return statements + (index_ddl(table, suffix) if indexes else [])


def index_ddl(table: Table, suffix: str = "") -> list[str]:
    """CREATE INDEX statements; a random token keeps names unique across rebuilds."""
    token = secrets.token_hex(3)
    return [
        f"CREATE INDEX ix_{table.name}_{number}_{token} ON {table.name}{suffix} ({columns})"
        for number, columns in enumerate(table.indexes)
    ]


def table_exists(cur: Cursor, name: str) -> bool:
    if cur.db.dialect == "sqlite":
        row = cur.fetchone("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    else:
        row = cur.fetchone(
            "SELECT 1 FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (name,),
        )
    return row is not None


def create_tables(
    cur: Cursor, tables: tuple[Table, ...], suffix: str = "", *, indexes: bool = True
) -> None:
    """Create the tables (and their indexes) that do not exist yet."""
    for table in tables:
        if not table_exists(cur, table.name + suffix):
            for statement in ddl(table, cur.db.dialect, suffix, indexes=indexes):
                cur.execute(statement)


def create_indexes(cur: Cursor, tables: tuple[Table, ...], suffix: str = "") -> None:
    """The secondary indexes of tables created without them (a bulk load is done)."""
    for table in tables:
        for statement in index_ddl(table, suffix):
            cur.execute(statement)


def drop_tables(cur: Cursor, tables: tuple[Table, ...], suffix: str = "") -> None:
    for table in tables:
        cur.execute(f"DROP TABLE IF EXISTS {table.name}{suffix}")


def swap_tables(cur: Cursor, tables: tuple[Table, ...], suffix: str) -> None:
    """Replace the live tables by the suffixed ones, inside the caller's transaction."""
    for table in tables:
        cur.execute(f"DROP TABLE IF EXISTS {table.name}")
        cur.execute(f"ALTER TABLE {table.name}{suffix} RENAME TO {table.name}")


DRILL_TABLES: tuple[Table, ...] = (
    Table(
        "view_drills",
        "drill_id TEXT{C} PRIMARY KEY, backup_id TEXT NOT NULL, passed INTEGER NOT NULL,"
        " reason TEXT NOT NULL, recorded_at TEXT{C} NOT NULL, position BIGINT NOT NULL,"
        " report TEXT NOT NULL",
        ("recorded_at, drill_id",),
    ),
)
