"""Alembic environment: runs the revisions on the connection dingtalk-etl hands over.

`dingtalk-etl db upgrade` passes an open connection in ``config.attributes["connection"]``;
plain `alembic` finds the URL itself (see alembic.ini).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

config = context.config


def _url() -> str:
    x_args = context.get_x_argument(as_dictionary=True)
    if x_args.get("url"):
        return x_args["url"]
    if os.environ.get("DINGTALK_ETL_DATABASE_URL"):
        return os.environ["DINGTALK_ETL_DATABASE_URL"]
    # Relative SQLite paths resolve against the config file's folder, as for the CLI.
    from etl.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(None), need_api=False)
    return cfg.database_url.render_as_string(hide_password=False)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("dingtalk-etl migrations run online only: give a database URL")
run_migrations_online()
