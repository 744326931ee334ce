"""Schema migrations: Alembic driven programmatically on our own engine.

Finds the revisions in the source tree (``migrations/``) or, in an installed wheel, in
``etl/_migrations``. Knows Alembic and SQL only.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from etl.errors import SchemaNotMigrated

_PACKAGE = Path(__file__).resolve().parent


def migrations_dir() -> Path:
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("dingtalk-etl migrations not found (broken installation)")


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every revision up to head; return (revision before, revision after)."""
    before = current_revision(engine)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, head_revision()


def check_schema(engine: Engine) -> None:
    """Raise ``SchemaNotMigrated`` unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no dingtalk-etl schema" if current is None else f"is at revision {current}"
        raise SchemaNotMigrated(
            f"the database {state}, this version needs {head}: "
            "run `dingtalk-etl db upgrade` (or pass --migrate)"
        )
