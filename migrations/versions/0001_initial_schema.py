"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('actor', sa.String(length=320), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('charge_id', sa.BigInteger(), nullable=True),
    sa.Column('subscription_id', sa.BigInteger(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('details', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_index(op.f('ix_audit_log_charge_id'), 'audit_log', ['charge_id'], unique=False)
    op.create_table('customers',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('country', sa.String(length=2), nullable=True),
    sa.Column('stripe_customer_id', sa.String(length=64), nullable=True),
    sa.Column('default_payment_method_id', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_customers')),
    sa.UniqueConstraint('stripe_customer_id', name=op.f('uq_customers_stripe_customer_id'))
    )
    op.create_table('webhook_events',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('stripe_event_id', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=80), nullable=False),
    sa.Column('object_id', sa.String(length=64), nullable=True),
    sa.Column('event_created', sa.BigInteger(), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_events')),
    sa.UniqueConstraint('stripe_event_id', name=op.f('uq_webhook_events_stripe_event_id'))
    )
    op.create_index(op.f('ix_webhook_events_object_id'), 'webhook_events', ['object_id'], unique=False)
    op.create_table('payment_methods',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('stripe_payment_method_id', sa.String(length=64), nullable=False),
    sa.Column('brand', sa.String(length=32), nullable=True),
    sa.Column('last4', sa.String(length=4), nullable=True),
    sa.Column('exp_month', sa.Integer(), nullable=True),
    sa.Column('exp_year', sa.Integer(), nullable=True),
    sa.Column('country', sa.String(length=2), nullable=True),
    sa.Column('fingerprint', sa.String(length=64), nullable=True),
    sa.Column('mandate_id', sa.String(length=64), nullable=True),
    sa.Column('setup_intent_id', sa.String(length=64), nullable=True),
    sa.Column('saved_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('previous_authorization', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('detached_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_payment_methods_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payment_methods')),
    sa.UniqueConstraint('stripe_payment_method_id', name=op.f('uq_payment_methods_stripe_payment_method_id'))
    )
    op.create_index(op.f('ix_payment_methods_customer_id'), 'payment_methods', ['customer_id'], unique=False)
    op.create_index('uq_payment_methods_customer_fingerprint', 'payment_methods', ['customer_id', 'fingerprint'], unique=True, postgresql_where=sa.text('fingerprint IS NOT NULL'))
    op.create_foreign_key(op.f('fk_customers_default_payment_method_id_payment_methods'), 'customers',
                          'payment_methods', ['default_payment_method_id'], ['id'], ondelete='SET NULL')
    op.create_table('card_setups',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('setup_intent_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=40), nullable=False),
    sa.Column('payment_method_id', sa.BigInteger(), nullable=True),
    sa.Column('last_error_code', sa.String(length=64), nullable=True),
    sa.Column('last_error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_card_setups_customer_id_customers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['payment_method_id'], ['payment_methods.id'], name=op.f('fk_card_setups_payment_method_id_payment_methods'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_card_setups')),
    sa.UniqueConstraint('setup_intent_id', name=op.f('uq_card_setups_setup_intent_id'))
    )
    op.create_index(op.f('ix_card_setups_customer_id'), 'card_setups', ['customer_id'], unique=False)
    op.create_table('subscriptions',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('payment_method_id', sa.BigInteger(), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('interval', sa.String(length=8), nullable=False),
    sa.Column('interval_count', sa.Integer(), nullable=False),
    sa.Column('anchor_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_period_index', sa.Integer(), nullable=False),
    sa.Column('next_charge_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('current_period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('current_period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('canceled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("interval IN ('day', 'week', 'month', 'year')", name=op.f('ck_subscriptions_interval_valid')),
    sa.CheckConstraint("status IN ('active', 'past_due', 'unpaid', 'canceled')", name=op.f('ck_subscriptions_status_valid')),
    sa.CheckConstraint('amount > 0', name=op.f('ck_subscriptions_amount_positive')),
    sa.CheckConstraint('interval_count > 0', name=op.f('ck_subscriptions_interval_count_positive')),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_subscriptions_customer_id_customers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['payment_method_id'], ['payment_methods.id'], name=op.f('fk_subscriptions_payment_method_id_payment_methods'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscriptions'))
    )
    op.create_index(op.f('ix_subscriptions_customer_id'), 'subscriptions', ['customer_id'], unique=False)
    op.create_index('ix_subscriptions_due', 'subscriptions', ['next_charge_at'], unique=False, postgresql_where=sa.text("status = 'active'"))
    op.create_table('charges',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('subscription_id', sa.BigInteger(), nullable=False),
    sa.Column('period_index', sa.Integer(), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('payment_intent_id', sa.String(length=64), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error_code', sa.String(length=64), nullable=True),
    sa.Column('last_decline_code', sa.String(length=64), nullable=True),
    sa.Column('last_advice_code', sa.String(length=64), nullable=True),
    sa.Column('first_failed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('retry_paused', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('notified_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('paid_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'processing', 'paid', 'authentication_required', 'requires_payment_method', 'uncollectible', 'void')", name=op.f('ck_charges_status_valid')),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscriptions.id'], name=op.f('fk_charges_subscription_id_subscriptions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_charges')),
    sa.UniqueConstraint('payment_intent_id', name=op.f('uq_charges_payment_intent_id')),
    sa.UniqueConstraint('subscription_id', 'period_index', name=op.f('uq_charges_subscription_id_period_index'))
    )
    op.create_index('ix_charges_in_flight', 'charges', ['updated_at'], unique=False, postgresql_where=sa.text("status IN ('pending', 'processing')"))
    op.create_index('ix_charges_queue', 'charges', ['status', 'created_at'], unique=False, postgresql_where=sa.text("status <> 'paid'"))
    op.create_index('ix_charges_retry_due', 'charges', ['next_retry_at'], unique=False, postgresql_where=sa.text("status = 'requires_payment_method' AND retry_paused = false"))
    op.create_table('attempts',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('charge_id', sa.BigInteger(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=64), nullable=False),
    sa.Column('phase', sa.String(length=16), nullable=False),
    sa.Column('payment_method_id', sa.BigInteger(), nullable=True),
    sa.Column('stripe_payment_method_id', sa.String(length=64), nullable=True),
    sa.Column('payment_intent_id', sa.String(length=64), nullable=True),
    sa.Column('outcome', sa.String(length=40), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('decline_code', sa.String(length=64), nullable=True),
    sa.Column('advice_code', sa.String(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("phase IN ('started', 'finished')", name=op.f('ck_attempts_phase_valid')),
    sa.ForeignKeyConstraint(['charge_id'], ['charges.id'], name=op.f('fk_attempts_charge_id_charges'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['payment_method_id'], ['payment_methods.id'], name=op.f('fk_attempts_payment_method_id_payment_methods'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempts')),
    sa.UniqueConstraint('charge_id', 'number', name=op.f('uq_attempts_charge_id_number')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_attempts_idempotency_key'))
    )
    op.create_index('ix_attempts_unfinished', 'attempts', ['started_at'], unique=False, postgresql_where=sa.text("phase = 'started'"))
    op.create_table('notifications',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('dedupe_key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('charge_id', sa.BigInteger(), nullable=True),
    sa.Column('to_email', sa.String(length=320), nullable=False),
    sa.Column('context', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('send_after', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('tries', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'sent', 'dropped')", name=op.f('ck_notifications_status_valid')),
    sa.ForeignKeyConstraint(['charge_id'], ['charges.id'], name=op.f('fk_notifications_charge_id_charges'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_notifications_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_notifications')),
    sa.UniqueConstraint('dedupe_key', name=op.f('uq_notifications_dedupe_key'))
    )
    op.create_index(op.f('ix_notifications_charge_id'), 'notifications', ['charge_id'], unique=False)
    op.create_index('ix_notifications_due', 'notifications', ['send_after'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_table('recovery_tokens',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('charge_id', sa.BigInteger(), nullable=True),
    sa.Column('card_setup_id', sa.BigInteger(), nullable=True),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['card_setup_id'], ['card_setups.id'], name=op.f('fk_recovery_tokens_card_setup_id_card_setups'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['charge_id'], ['charges.id'], name=op.f('fk_recovery_tokens_charge_id_charges'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_recovery_tokens_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_recovery_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_recovery_tokens_token_hash'))
    )
    op.create_index(op.f('ix_recovery_tokens_charge_id'), 'recovery_tokens', ['charge_id'], unique=False)

    # The audit log is append-only: the database itself refuses to rewrite history.
    op.execute("""
        CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only';
        END $$;
    """)
    op.execute("""
        CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
    """)


def downgrade() -> None:
    op.drop_constraint(op.f('fk_customers_default_payment_method_id_payment_methods'), 'customers',
                       type_='foreignkey')
    op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
    op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    op.drop_index(op.f('ix_recovery_tokens_charge_id'), table_name='recovery_tokens')
    op.drop_table('recovery_tokens')
    op.drop_index('ix_notifications_due', table_name='notifications', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index(op.f('ix_notifications_charge_id'), table_name='notifications')
    op.drop_table('notifications')
    op.drop_index('ix_attempts_unfinished', table_name='attempts', postgresql_where=sa.text("phase = 'started'"))
    op.drop_table('attempts')
    op.drop_index('ix_charges_retry_due', table_name='charges', postgresql_where=sa.text("status = 'requires_payment_method' AND retry_paused = false"))
    op.drop_index('ix_charges_queue', table_name='charges', postgresql_where=sa.text("status <> 'paid'"))
    op.drop_index('ix_charges_in_flight', table_name='charges', postgresql_where=sa.text("status IN ('pending', 'processing')"))
    op.drop_table('charges')
    op.drop_index('ix_subscriptions_due', table_name='subscriptions', postgresql_where=sa.text("status = 'active'"))
    op.drop_index(op.f('ix_subscriptions_customer_id'), table_name='subscriptions')
    op.drop_table('subscriptions')
    op.drop_index(op.f('ix_card_setups_customer_id'), table_name='card_setups')
    op.drop_table('card_setups')
    op.drop_index('uq_payment_methods_customer_fingerprint', table_name='payment_methods', postgresql_where=sa.text('fingerprint IS NOT NULL'))
    op.drop_index(op.f('ix_payment_methods_customer_id'), table_name='payment_methods')
    op.drop_table('payment_methods')
    op.drop_index(op.f('ix_webhook_events_object_id'), table_name='webhook_events')
    op.drop_table('webhook_events')
    op.drop_table('customers')
    op.drop_index(op.f('ix_audit_log_charge_id'), table_name='audit_log')
    op.drop_table('audit_log')
