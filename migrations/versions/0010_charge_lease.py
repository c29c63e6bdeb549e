"""a lease on the charge row replaces the session-level advisory lock held across the Stripe call

``charges.lease_token`` names who is working on the charge outside any transaction (an attempt:
``<attempt id>.<random>``; the recovery page making a PaymentIntent: ``page.<random>``) and is the
fencing token its later writes must still find; ``charges.lease_expires_at`` is when the hold lapses
unless renewed (by the database's clock). A lease is free when either is NULL or the time has passed,
so existing rows need no backfill. No index: every reader finds the row by its primary key.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('charges', sa.Column('lease_token', sa.String(length=64), nullable=True))
    op.add_column('charges', sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('charges', 'lease_expires_at')
    op.drop_column('charges', 'lease_token')
