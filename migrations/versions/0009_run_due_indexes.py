"""the billing run's open-charge check reads an index of open charges only; subscriptions vacuumed sooner

The run opens a period only for a subscription with no open charge (one open period at a time). That
``NOT EXISTS`` is answered from ``ix_charges_open``, which holds only charges that are not final, so
its cost does not grow with a subscription's history of paid periods.

Every run rewrites the row of each subscription it opens, and the old versions stay in
``ix_subscriptions_due`` (their ``next_charge_at`` was due) until a vacuum: the next run's "what is
due?" probe then visits each of them. Autovacuum's default waits for a fifth of the table to be dead;
subscriptions are vacuumed (and analyzed) after 2% instead.

Built ``CONCURRENTLY`` (outside the migration's transaction, with no statement timeout): on a large
``charges`` table a plain build would block every charge write for as long as it takes. A build that
failed half-way leaves an invalid index behind; it is dropped first, so running this again finishes
the job.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

OPEN_CHARGES = sa.text("status NOT IN ('paid', 'uncollectible', 'void')")


def upgrade() -> None:
    context = op.get_context()
    with context.autocommit_block():
        # The session's timeout (migrations/env.py) is put back afterwards for the next migrations.
        timeout = "60s" if context.as_sql else op.get_bind().exec_driver_sql("SHOW statement_timeout").scalar()
        op.execute("SET statement_timeout = 0")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_charges_open")
        op.create_index('ix_charges_open', 'charges', ['subscription_id'], unique=False,
                        postgresql_where=OPEN_CHARGES, postgresql_concurrently=True)
        op.execute(f"SET statement_timeout = '{timeout}'")
    op.execute("ALTER TABLE subscriptions SET (autovacuum_vacuum_scale_factor = 0.02, "
               "autovacuum_analyze_scale_factor = 0.02)")


def downgrade() -> None:
    op.execute("ALTER TABLE subscriptions RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor)")
    op.drop_index('ix_charges_open', table_name='charges', postgresql_where=OPEN_CHARGES)
