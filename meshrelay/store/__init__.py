"""Storage backends behind one interface (:mod:`meshrelay.store.base`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where used: the store writer's child process imports this package (for
    # ``sqlite_core``) and must not load the node's config, web and Twisted modules with it.
    from meshrelay.config import Config
    from meshrelay.store.base import Caps, Store

#: reader connections (and threads) per process for the PostgreSQL backend
READER_THREADS = 3


def caps_from(config: Config) -> Caps:
    from meshrelay.store.base import Caps

    lim = config.limits
    return Caps(
        per_sender_pending=lim.per_sender_pending,
        per_mailbox_pending=lim.per_mailbox_pending,
        max_stored_bytes=lim.max_stored_bytes,
        max_refused=config.sync.max_refused,
        max_policies=lim.max_policies,
    )


def open_store(config: Config, reactor: Any, metrics: Any = None) -> Store:
    """Open (creating and migrating as needed) the configured backend, its writes and reads off the reactor.

    SQLite writes on a writer thread (or in the writer process, ``node.store_writer``) and
    reads on two reader threads; PostgreSQL on one writer and ``READER_THREADS`` reader
    connections.  (The in-memory tests pass :class:`~meshrelay.node.Node` a ``store_factory``
    of their own, that runs everything inline under a ``Clock``.)

    Raises :class:`StoreError` with a one-line reason when it cannot be opened.
    """
    from meshrelay.executor import ThreadExecutor
    from meshrelay.store.base import StoreError

    caps = caps_from(config)
    if config.store.backend == "sqlite":
        from meshrelay.store.sqlite import DB_NAME, SQLiteStore

        writer_process: Any = None
        writer: ThreadExecutor | None = None
        if config.node.store_writer == "process":
            from meshrelay.store.writer_process import ProcessWriter

            path = os.path.join(config.node.data_dir, DB_NAME)
            writer_process = ProcessWriter(reactor, path, config.node.durability, caps)
        else:
            writer = ThreadExecutor(reactor, 1, "meshrelay-writer")
        return SQLiteStore(
            config.node.data_dir,
            caps,
            durability=config.node.durability,
            writer=writer,
            readers=ThreadExecutor(reactor, 2, "meshrelay-readers"),
            metrics=metrics,
            writer_process=writer_process,
        )
    if config.store.backend == "postgresql":
        try:
            from meshrelay.store.postgres import PostgresStore
        except ImportError as e:
            raise StoreError(
                f"store.backend 'postgresql' needs psycopg 3 ({e}): pip install 'meshrelay[postgresql]'"
            ) from e
        return PostgresStore(
            config.store.dsn,
            caps,
            reactor=reactor,
            writer=ThreadExecutor(reactor, 1, "meshrelay-pg-writer"),
            readers=ThreadExecutor(reactor, READER_THREADS, "meshrelay-pg-readers"),
            metrics=metrics,
        )
    raise StoreError(f"store.backend {config.store.backend!r} is not available in this build")
