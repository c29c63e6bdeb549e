"""The HTTP app (FastAPI): JSON API, webhook endpoint, customer pages, finance console."""
