"""installation id and random idempotency-key parts: a Stripe object is acted on only when it is provably ours

``installations`` holds one row: the id that tags every Stripe object this installation creates
(``metadata.installation``) when ``BILLING_INSTALLATION_ID`` is not set, generated here once
(``inst_`` + 16 hex digits), and since when objects are tagged (its ``created_at``). An attempt
started before that sent untagged metadata; billing.ownership still recognises what it made.

``customers.stripe_create_key`` and ``charges.recovery_key`` hold the idempotency keys of the Stripe
customer's creation and of the recovery page's PaymentIntent, with a random part (ids repeat after a
restore or in another installation on the account; the random part does not). Rows whose creation
may be in doubt right now (a customer without its Stripe id, an unsettled charge without a
PaymentIntent) get the key the previous code used (``customer-<id>``, ``recover-charge-<id>``), so a
creation whose answer was lost is replayed, not made twice; the recovery page draws a new key as
soon as such a key's PaymentIntent turns out canceled or Stripe refuses the key.

Downgrade drops the table, and the generated id with it: before upgrading again, put that id
(``SELECT installation_id FROM installations``) in ``BILLING_INSTALLATION_ID``, or what was tagged with
it counts as foreign.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('installations',
    sa.Column('id', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('installation_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('id = 1', name=op.f('ck_installations_single_row')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_installations'))
    )
    op.execute(sa.text("INSERT INTO installations (id, installation_id) VALUES (1, :iid)")
               .bindparams(iid=f"inst_{secrets.token_hex(8)}"))

    op.add_column('customers', sa.Column('stripe_create_key', sa.String(length=80), nullable=True))
    op.create_unique_constraint(op.f('uq_customers_stripe_create_key'), 'customers', ['stripe_create_key'])
    op.execute("UPDATE customers SET stripe_create_key = 'customer-' || id WHERE stripe_customer_id IS NULL")

    op.add_column('charges', sa.Column('recovery_key', sa.String(length=80), nullable=True))
    op.create_unique_constraint(op.f('uq_charges_recovery_key'), 'charges', ['recovery_key'])
    op.execute("UPDATE charges SET recovery_key = 'recover-charge-' || id "
               "WHERE payment_intent_id IS NULL AND status IN ('authentication_required', 'requires_payment_method')")


def downgrade() -> None:
    op.drop_constraint(op.f('uq_charges_recovery_key'), 'charges', type_='unique')
    op.drop_column('charges', 'recovery_key')
    op.drop_constraint(op.f('uq_customers_stripe_create_key'), 'customers', type_='unique')
    op.drop_column('customers', 'stripe_create_key')
    op.drop_table('installations')
