"""PostgreSQL for tests: the DSN from the environment, and one throw-away schema per test.

The PostgreSQL tests run whenever ``MESHRELAY_TEST_PG_DSN`` names a database
the tests may create schemas in (``.ci/run`` always sets it).  Without it they
are skipped, and the skip reason says how to run them.  Each test gets its own
schema (``CREATE SCHEMA`` / ``DROP SCHEMA ... CASCADE``) and a DSN whose
``search_path`` points at it, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
import unittest
from collections.abc import Callable
from typing import Any, TypeVar

ENV = "MESHRELAY_TEST_PG_DSN"
SKIP_REASON = (
    f"PostgreSQL tests skipped: {ENV} is not set. To run them: "
    f"{ENV}=postgresql://postgres@127.0.0.1:5432/test python -m pytest (.ci/run always sets it)"
)

C = TypeVar("C")


def base_dsn() -> str | None:
    return os.environ.get(ENV) or None


def _psycopg_missing() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        return f"{ENV} is set but psycopg is not installed ({e}): pip install '.[postgresql]'"
    return None


def requires_pg(cls: C) -> C:
    """Skip a test class unless a PostgreSQL DSN is given (and fail loudly if psycopg is missing)."""
    if base_dsn() is None:
        return unittest.skip(SKIP_REASON)(cls)  # type: ignore[no-any-return]
    missing = _psycopg_missing()
    if missing is not None:
        raise RuntimeError(missing)
    return cls


def create_schema(add_cleanup: Callable[..., Any], prefix: str = "mr_test") -> str:
    """A fresh schema on the test database; returns a DSN whose search_path is that schema.

    The schema is dropped (with everything in it) by a cleanup registered
    now, so it runs after the cleanups that close the stores using it.
    """
    import psycopg
    from psycopg.conninfo import make_conninfo

    base = base_dsn()
    assert base is not None
    schema = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    add_cleanup(drop)
    return make_conninfo(base, options=f"-csearch_path={schema}")


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on its own autocommit connection; returns the rows (if any)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return list(cur.fetchall()) if cur.description else []
