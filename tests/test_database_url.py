"""``RESULTSVC_DATABASE_URL``: one string decides where years of events live.

A wrong URL must be refused with a reason before anything is written, and
nothing derived from the URL that may end up in logs or error pages (the
display form, error messages) may ever contain the password.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.database import (
    BadDatabaseUrl,
    DatabaseUnavailable,
    open_application,
    parse_database_url,
)

SECRET = "s3cretpw"

# --------------------------------------------------------------------- sqlite


def test_sqlite_relative_path() -> None:
    """Three slashes: a path relative to the working directory."""
    config = parse_database_url("sqlite:///var/resultsvc.db")
    assert config.kind == "sqlite"
    assert config.sqlite_path == Path("var/resultsvc.db")
    assert not config.sqlite_path.is_absolute()
    assert config.display == "sqlite:///var/resultsvc.db"


def test_sqlite_absolute_path() -> None:
    """Four slashes: an absolute path."""
    config = parse_database_url("sqlite:////srv/data/resultsvc.db")
    assert config.sqlite_path == Path("/srv/data/resultsvc.db")
    assert config.sqlite_path.is_absolute()


def test_sqlite_settings_for_eventsourcing() -> None:
    """The URL must reach eventsourcing as its own SQLite settings."""
    env = parse_database_url("sqlite:////srv/r.db").eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
    assert env["SQLITE_DBNAME"] == "/srv/r.db"


@pytest.mark.parametrize("url", ["sqlite://host/r.db", "sqlite:///", "sqlite:", "sqlite://"])
def test_bad_sqlite_urls_are_refused(url: str) -> None:
    """A host or no file at all is a mistake, not a default."""
    with pytest.raises(BadDatabaseUrl) as caught:
        parse_database_url(url)
    assert "sqlite" in str(caught.value)


def test_sqlite_folder_that_cannot_be_created_is_unavailable(tmp_path: Path) -> None:
    """A path under a regular file cannot hold a database: a clear one-line refusal."""
    (tmp_path / "file").write_text("not a folder")
    url = f"sqlite:///{tmp_path}/file/sub/r.db"
    with pytest.raises(DatabaseUnavailable) as caught:
        open_application(url)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{tmp_path}/file/sub/r.db" in message


def test_sqlite_application_opens_and_creates_its_folder(tmp_path: Path) -> None:
    """The embedded default works out of the box, even when the folder is missing."""
    app = open_application(f"sqlite:///{tmp_path}/new/folder/r.db")
    try:
        _, position = app.create_team("t")
        assert app.head_position() == position > 0
    finally:
        app.close()
    assert (tmp_path / "new" / "folder" / "r.db").is_file()


# ----------------------------------------------------------------- postgresql


def test_postgresql_full_url() -> None:
    """User, password, host, port, database and schema all land in their fields."""
    config = parse_database_url(f"postgresql://app:{SECRET}@db.internal:6543/results?schema=rs_1")
    assert config.kind == "postgresql"
    assert (config.user, config.password) == ("app", SECRET)
    assert (config.host, config.port, config.dbname) == ("db.internal", 6543, "results")
    assert config.schema == "rs_1"
    assert config.display == "postgresql://app@db.internal:6543/results?schema=rs_1"


def test_postgresql_defaults() -> None:
    """No password, port or schema: 5432 and ``public``; ``postgres://`` is the same."""
    for scheme in ("postgresql", "postgres"):
        config = parse_database_url(f"{scheme}://app@db.internal/results")
        assert (config.kind, config.password, config.port) == ("postgresql", "", 5432)
        assert config.schema == "public"
        assert config.display == "postgresql://app@db.internal:5432/results"


def test_postgresql_user_defaults_to_pguser_then_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a user in the URL, the libpq convention applies."""
    monkeypatch.delenv("PGUSER", raising=False)
    assert parse_database_url("postgresql://db.internal/results").user == "postgres"
    monkeypatch.setenv("PGUSER", "operator")
    assert parse_database_url("postgresql://db.internal/results").user == "operator"


def test_postgresql_percent_encoded_parts_are_decoded() -> None:
    """Passwords with ``@`` or ``/`` must be percent-encoded in URLs and are decoded here."""
    password = "p@ss/w:rd%"
    config = parse_database_url(f"postgresql://app:{quote(password, safe='')}@h/my%20db")
    assert config.password == password
    assert config.dbname == "my db"


def test_postgresql_settings_for_eventsourcing() -> None:
    """The schema and connection details reach eventsourcing as its own settings."""
    env = parse_database_url(
        f"postgresql://app:{SECRET}@db.internal:6543/results?schema=rs_1"
    ).eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert env["POSTGRES_HOST"] == "db.internal"
    assert env["POSTGRES_PORT"] == "6543"
    assert env["POSTGRES_USER"] == "app"
    assert env["POSTGRES_PASSWORD"] == SECRET
    assert env["POSTGRES_DBNAME"] == "results"
    assert env["POSTGRES_SCHEMA"] == "rs_1"


def test_schema_of_63_characters_is_accepted() -> None:
    """63 bytes is PostgreSQL's identifier limit."""
    assert parse_database_url("postgresql://h/db?schema=" + "s" * 63).schema == "s" * 63


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app@h/db",
        "http://h/db",
        "results.db",
        "",
        "postgresql://app@h",
        "postgresql://app@h/",
        "postgresql://h/db?schema=Public",
        "postgresql://h/db?schema=1abc",
        "postgresql://h/db?schema=a-b",
        "postgresql://h/db?schema=a;drop%20schema%20public",
        "postgresql://h/db?schema=%22x%22",
        "postgresql://h/db?schema=" + "s" * 64,
        "postgresql://h:notaport/db",
        "postgresql://h:99999/db",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    """Unknown schemes, a missing database, unsafe schema names and bad ports never connect."""
    with pytest.raises(BadDatabaseUrl) as caught:
        parse_database_url(url)
    assert str(caught.value)
    assert isinstance(caught.value, ValueError)


passwords = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E)
    | st.characters(min_codepoint=0xA0, codec="utf-8"),
    min_size=1,
    max_size=30,
).map(lambda text: "pw-" + text)


@settings(max_examples=150, deadline=None)
@given(password=passwords, schema=st.sampled_from(["public", "rs_1"]))
def test_display_never_contains_the_password(password: str, schema: str) -> None:
    """``display`` and ``repr`` go to logs; the password, encoded or not, never does."""
    url = f"postgresql://app:{quote(password, safe='')}@db.internal:5433/results?schema={schema}"
    config = parse_database_url(url)
    assert config.password == password
    for shown in (config.display, repr(config)):
        assert password not in shown
        assert quote(password, safe="") not in shown
        assert "pw-" not in shown
    assert urlsplit(config.display).password is None


def test_unreachable_postgresql_is_one_line_without_the_password() -> None:
    """Nothing listens on port 1: the refusal is one safe line, not a traceback with secrets."""
    with pytest.raises(DatabaseUnavailable) as caught:
        open_application(f"postgresql://u:{SECRET}@127.0.0.1:1/x")
    message = str(caught.value)
    assert message
    assert "\n" not in message and "\r" not in message
    assert SECRET not in message
    assert "postgresql://u@127.0.0.1:1/x" in message
    # The psycopg error (which may quote the connection string) is not chained either.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.postgres
def test_missing_postgresql_database_is_one_line_without_the_password(pg_url: str) -> None:
    """A real server that refuses the connection gives the same kind of safe refusal."""
    config = parse_database_url(pg_url)
    url = (
        f"postgresql://{config.user}:{SECRET}@{config.host}:{config.port}"
        "/resultsvc_no_such_database"
    )
    with pytest.raises(DatabaseUnavailable) as caught:
        open_application(url)
    message = str(caught.value)
    assert "\n" not in message
    assert SECRET not in message
    assert "resultsvc_no_such_database" in message


@pytest.mark.postgres
def test_postgresql_schema_is_created_when_missing(pg_url: str) -> None:
    """A fresh schema named in the URL is created and used by the event store."""
    config = parse_database_url(pg_url)
    app = open_application(pg_url)
    try:
        _, position = app.create_team("t")
        assert app.head_position() == position > 0
    finally:
        app.close()
    with psycopg.connect(config.conninfo()) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (config.schema,),
        ).fetchall()
    assert tables, f"no tables in schema {config.schema}"
