"""retries count failures, not attempts; give-up time stored apart; a staff retry is a durable request

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('charges', sa.Column('failures', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('charges', sa.Column('give_up_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('charges', sa.Column('retry_requested_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('attempts', sa.Column('manual', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    # Charges failing today: count their declines so far, and give them up when they would have been.
    op.execute("""
        UPDATE charges c SET failures = d.n FROM (
            SELECT charge_id, count(*) AS n FROM attempts WHERE outcome = 'declined' GROUP BY charge_id) d
        WHERE d.charge_id = c.id""")
    op.execute("UPDATE charges SET give_up_at = first_failed_at + interval '14 days' "
               "WHERE first_failed_at IS NOT NULL AND status IN ('authentication_required', 'requires_payment_method')")
    op.execute("UPDATE charges SET next_retry_at = NULL WHERE status = 'authentication_required'")
    op.create_index('ix_charges_give_up_due', 'charges', ['give_up_at'], unique=False,
                    postgresql_where=sa.text('give_up_at IS NOT NULL'))
    op.create_index('ix_charges_retry_requested', 'charges', ['retry_requested_at'], unique=False,
                    postgresql_where=sa.text('retry_requested_at IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_charges_retry_requested', table_name='charges',
                  postgresql_where=sa.text('retry_requested_at IS NOT NULL'))
    op.drop_index('ix_charges_give_up_due', table_name='charges', postgresql_where=sa.text('give_up_at IS NOT NULL'))
    op.drop_column('attempts', 'manual')
    op.drop_column('charges', 'retry_requested_at')
    op.drop_column('charges', 'give_up_at')
    op.drop_column('charges', 'failures')
