"""Recurring off-session card billing on Stripe."""
