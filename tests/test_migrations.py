"""The schema comes from Alembic, agrees with etl.schema, and upgrades idempotently."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from etl import migrate
from etl.db import create_db_engine
from etl.schema import metadata

TABLES = {"chats", "chat_members", "chat_events", "sync_runs", "sync_run_items"}


def test_upgrade_on_empty_database_creates_all_tables_and_is_idempotent(empty_db: URL) -> None:
    engine = create_db_engine(empty_db)
    try:
        assert migrate.current_revision(engine) is None
        before, after = migrate.upgrade(engine)
        assert (before, after) == (None, migrate.head_revision())
        assert set(inspect(engine).get_table_names()) >= TABLES
        again = migrate.upgrade(engine)
        assert again == (after, after)
        migrate.check_schema(engine)
    finally:
        engine.dispose()


def test_migrated_schema_matches_table_definitions(db_url: URL) -> None:
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": False, "compare_server_default": False}
            )
            diff = [d for d in compare_metadata(ctx, metadata) if d[0] != "remove_table"]
        assert diff == []
    finally:
        engine.dispose()


def test_the_cheap_schema_check_knows_alembics_head() -> None:
    assert migrate.head_revision() == migrate.HEAD_REVISION


def test_the_revision_read_without_alembic_is_alembics(db_url: URL) -> None:
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            expected = MigrationContext.configure(conn).get_current_revision()
        assert migrate.current_revision(engine) == expected == migrate.HEAD_REVISION
    finally:
        engine.dispose()


def test_a_version_table_that_cannot_be_read_is_an_error_not_an_empty_database(
    empty_db: URL,
) -> None:
    engine = create_db_engine(empty_db)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE alembic_version (something_else INTEGER)"))
        with pytest.raises(DBAPIError):
            migrate.current_revision(engine)
    finally:
        engine.dispose()


def test_checking_the_schema_imports_no_alembic(db_url: URL) -> None:
    """A command's schema check costs one query, not Alembic's start-up."""
    script = (
        "import sys\n"
        "from sqlalchemy.engine import make_url\n"
        "from etl.db import create_db_engine, require_schema\n"
        "engine = create_db_engine(make_url(sys.argv[1]))\n"
        "require_schema(engine, 'checking')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    url = db_url.render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, "-c", script, url], capture_output=True, text=True, check=True
    )
    assert done.stdout == "[]\n"
