"""
Fresh PostgreSQL databases on the local server (127.0.0.1:5432), one per use.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

#: The maintenance database on the test server (user postgres, trust auth).
ADMIN_URL = os.environ.get(
    "KELPIE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """
    Create an empty database ``kelpie_<random>``, yield its URL, drop it.
    """
    import psycopg

    name = f"kelpie_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
