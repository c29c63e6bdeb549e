"""finance console: staff accounts, sessions, login failures, queue indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_OPEN = sa.text("status <> 'paid'")


def upgrade() -> None:
    op.create_table('staff_users',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("role IN ('viewer', 'operator')", name=op.f('ck_staff_users_role_valid')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_staff_users')),
    sa.UniqueConstraint('email', name=op.f('uq_staff_users_email'))
    )
    op.create_table('staff_sessions',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('staff_user_id', sa.BigInteger(), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['staff_user_id'], ['staff_users.id'], name=op.f('fk_staff_sessions_staff_user_id_staff_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_staff_sessions')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_staff_sessions_token_hash'))
    )
    op.create_index(op.f('ix_staff_sessions_staff_user_id'), 'staff_sessions', ['staff_user_id'], unique=False)
    op.create_table('login_failures',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('ip', sa.String(length=64), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_login_failures'))
    )
    op.create_index('ix_login_failures_email_at', 'login_failures', ['email', 'at'], unique=False)
    op.create_index('ix_login_failures_ip_at', 'login_failures', ['ip', 'at'], unique=False)
    op.create_index('ix_charges_queue_next_retry', 'charges', ['next_retry_at', 'id'], unique=False, postgresql_where=_OPEN)
    op.create_index('ix_charges_queue_created', 'charges', ['created_at', 'id'], unique=False, postgresql_where=_OPEN)
    op.create_index('ix_charges_queue_amount', 'charges', ['amount', 'id'], unique=False, postgresql_where=_OPEN)
    op.create_index('ix_charges_queue_attempts', 'charges', ['attempts', 'id'], unique=False, postgresql_where=_OPEN)
    op.create_index('ix_charges_queue_decline', 'charges', ['last_decline_code', 'created_at'], unique=False, postgresql_where=_OPEN)
    op.create_index('ix_charges_first_failed', 'charges', ['first_failed_at'], unique=False, postgresql_where=sa.text('first_failed_at IS NOT NULL'))


def downgrade() -> None:
    for name in ('ix_charges_first_failed', 'ix_charges_queue_decline', 'ix_charges_queue_attempts',
                 'ix_charges_queue_amount', 'ix_charges_queue_created', 'ix_charges_queue_next_retry'):
        op.drop_index(name, table_name='charges')
    op.drop_index('ix_login_failures_ip_at', table_name='login_failures')
    op.drop_index('ix_login_failures_email_at', table_name='login_failures')
    op.drop_table('login_failures')
    op.drop_index(op.f('ix_staff_sessions_staff_user_id'), table_name='staff_sessions')
    op.drop_table('staff_sessions')
    op.drop_table('staff_users')
