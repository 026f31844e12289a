"""The throwaway PostgreSQL server of tests/pg.py: up, one fresh database per test, isolated."""
import psycopg


def test_fresh_database_is_empty_and_durable_settings_on(pg_url):
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
        assert c.execute("SHOW fsync").fetchone()[0] == "on"
        assert c.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert int(c.execute("SHOW server_version_num").fetchone()[0]) >= 150000
        c.execute("CREATE TABLE t(x int)")


def test_databases_are_isolated(pg_url):
    with psycopg.connect(pg_url) as c:  # the table the other test made is not here
        assert c.execute("SELECT to_regclass('public.t')").fetchone()[0] is None
