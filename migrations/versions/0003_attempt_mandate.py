"""attempts remember the mandate they were sent with

A resumed attempt must resend exactly the parameters of its first send (same idempotency key), even
when the card's mandate has changed since.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('attempts', sa.Column('mandate_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('attempts', 'mandate_id')
