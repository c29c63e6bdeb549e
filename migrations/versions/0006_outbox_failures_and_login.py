"""outbox rows that fail are retried with backoff and become dead; login attempts reserved before verifying

Outbox: the notifications' status CHECK is replaced by one that also allows ``dead`` (an email given
up after too many failures, or refused for good by the mail server). The new list is a superset of the
old one, so every existing row passes; the swap is one ALTER TABLE. A partial index on the dead rows
keeps the console's and the metrics' count cheap however long the outbox grows.

Login: the slow-down is now counted per account and per (account, client address), no longer per
address alone (which let one guesser lock every account out of a shared address): the address-only
index gives way to one on (email, ip, at).

Downgrade: dead rows go back to ``pending`` with their tries kept (the older relay retries them), and
the indexes are swapped back.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_OLD = ('pending', 'sent', 'dropped')
_NEW = (*_OLD, 'dead')


def _swap(statuses: tuple[str, ...]) -> None:
    values = ", ".join(f"'{s}'" for s in statuses)
    op.execute("ALTER TABLE notifications DROP CONSTRAINT ck_notifications_status_valid, "
               f"ADD CONSTRAINT ck_notifications_status_valid CHECK (status IN ({values}))")


def upgrade() -> None:
    _swap(_NEW)
    op.create_index('ix_notifications_dead', 'notifications', ['send_after'], unique=False,
                    postgresql_where=sa.text("status = 'dead'"))
    op.drop_index('ix_login_failures_ip_at', table_name='login_failures')
    op.create_index('ix_login_failures_email_ip_at', 'login_failures', ['email', 'ip', 'at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_login_failures_email_ip_at', table_name='login_failures')
    op.create_index('ix_login_failures_ip_at', 'login_failures', ['ip', 'at'], unique=False)
    op.drop_index('ix_notifications_dead', table_name='notifications', postgresql_where=sa.text("status = 'dead'"))
    op.execute("UPDATE notifications SET status = 'pending' WHERE status = 'dead'")
    _swap(_OLD)
