"""charge status needs_review: Stripe refused the request itself, staff decide

The charges' status CHECK constraint is replaced by one that also allows ``needs_review``. The new
list is a superset of the old one, so every existing row passes; the swap is one ALTER TABLE (drop
and add in a single statement) inside this migration's transaction. The retry queue's existing
partial index ``ix_charges_queue (status, created_at) WHERE status <> 'paid'`` already serves the
console's ``status = 'needs_review'`` filter, so no index is added.

Downgrade: a revision without the status cannot hold such rows; they go back to
``requires_payment_method`` with no retry scheduled (what the older code made of a refused request).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_OLD = ('pending', 'processing', 'paid', 'authentication_required', 'requires_payment_method', 'uncollectible',
        'void')
_NEW = (*_OLD, 'needs_review')


def _swap(statuses: tuple[str, ...]) -> None:
    values = ", ".join(f"'{s}'" for s in statuses)
    op.execute("ALTER TABLE charges DROP CONSTRAINT ck_charges_status_valid, "
               f"ADD CONSTRAINT ck_charges_status_valid CHECK (status IN ({values}))")


def upgrade() -> None:
    _swap(_NEW)


def downgrade() -> None:
    op.execute("UPDATE charges SET status = 'requires_payment_method', next_retry_at = NULL "
               "WHERE status = 'needs_review'")
    _swap(_OLD)
