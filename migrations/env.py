"""Alembic environment: one transaction per migration, with lock and statement timeouts so a
migration waiting on a busy table fails fast instead of queueing every query behind it
(warehouse ``migrations/env.py``)."""

from alembic import context
from sqlalchemy import text

from billing.db import make_engine
from billing.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connectable)


def _run(connection) -> None:
    connection.execute(text("SET lock_timeout = '4s'"))
    connection.execute(text("SET statement_timeout = '60s'"))
    connection.commit()
    context.configure(connection=connection, target_metadata=target_metadata,
                      transaction_per_migration=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
