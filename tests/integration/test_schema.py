import psycopg
import pytest

from billing import migrate


def test_models_and_migrations_do_not_drift(database_url):
    migrate.check(database_url)


def test_audit_log_refuses_updates_and_deletes(database_url, clean_db):
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("INSERT INTO audit_log (actor, action, details) VALUES ('ops@example.com', 'void', '{}')")
        for stmt in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(stmt)
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 1
