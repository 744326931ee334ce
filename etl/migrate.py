"""Schema migrations: Alembic driven programmatically on our own engine.

Finds the revisions in the source tree (``migrations/``) or, in an installed wheel, in
``etl/_migrations``. Knows Alembic and SQL only.

Every command checks the schema before it works (``check_schema``); that check reads the
``alembic_version`` row and compares it with ``HEAD_REVISION``, without importing Alembic
(whose script machinery and per-dialect modules cost a command more time than its work).
Alembic itself is imported only to migrate, or to explain a schema that is not at head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from etl.errors import SchemaNotMigrated

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# The revision this code needs: the newest in migrations/versions/ (a test checks that
# Alembic's head says the same).
HEAD_REVISION: Final = "0004"
_PACKAGE = Path(__file__).resolve().parent


def migrations_dir() -> Path:
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("dingtalk-etl migrations not found (broken installation)")


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def head_revision() -> str:
    """Alembic's head, from the revision files."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision (its ``alembic_version`` row); None on an empty database."""
    with engine.connect() as conn:
        try:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            # Asked only now whether the table exists: the catalogue query costs every
            # command as much as the read itself, and an empty database is rare.
            conn.rollback()
            if inspect(conn).has_table("alembic_version"):
                raise
            return None
        return None if revision is None else str(revision)


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every revision up to head; return (revision before, revision after)."""
    from alembic import command

    before = current_revision(engine)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, head_revision()


def check_schema(engine: Engine) -> None:
    """Raise ``SchemaNotMigrated`` unless the database is at the head revision."""
    current, head = current_revision(engine), HEAD_REVISION
    if current != head:
        state = "has no dingtalk-etl schema" if current is None else f"is at revision {current}"
        raise SchemaNotMigrated(
            f"the database {state}, this version needs {head}: "
            "run `dingtalk-etl db upgrade` (or pass --migrate)"
        )
