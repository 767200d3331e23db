"""Storage backends behind one interface (:mod:`meshrelay.store.base`)."""

from __future__ import annotations

import os
from typing import Any

from meshrelay.config import Config
from meshrelay.executor import InlineExecutor, ThreadExecutor
from meshrelay.store.base import Caps, Store, StoreError

#: reader connections (and threads) per process for the PostgreSQL backend
READER_THREADS = 3


def caps_from(config: Config) -> Caps:
    lim = config.limits
    return Caps(
        per_sender_pending=lim.per_sender_pending,
        per_mailbox_pending=lim.per_mailbox_pending,
        max_stored_bytes=lim.max_stored_bytes,
        max_refused=config.sync.max_refused,
        max_policies=lim.max_policies,
    )


def open_store(config: Config, reactor: Any, threaded: bool = True, metrics: Any = None) -> Store:
    """Open (creating and migrating as needed) the configured backend.

    Raises :class:`StoreError` with a one-line reason when it cannot be opened.
    """
    if config.store.backend == "sqlite":
        from meshrelay.store.sqlite import SQLiteStore

        if threaded:
            caps = caps_from(config)
            if config.node.store_writer == "process":
                from meshrelay.store.sqlite import DB_NAME
                from meshrelay.store.writer_process import ProcessWriter

                path = os.path.join(config.node.data_dir, DB_NAME)
                writer_process: Any = ProcessWriter(reactor, path, config.node.durability, caps)
                writer = None
            else:
                writer_process, writer = None, ThreadExecutor(reactor, 1, "meshrelay-writer")
            return SQLiteStore(
                config.node.data_dir,
                caps,
                durability=config.node.durability,
                writer=writer,
                readers=ThreadExecutor(reactor, 2, "meshrelay-readers"),
                metrics=metrics,
                writer_process=writer_process,
            )
        return SQLiteStore(
            config.node.data_dir,
            caps_from(config),
            durability=config.node.durability,
            writer=InlineExecutor(),
            metrics=metrics,
        )
    if config.store.backend == "postgresql":
        try:
            from meshrelay.store.postgres import PostgresStore
        except ImportError as e:
            raise StoreError(
                f"store.backend 'postgresql' needs psycopg 3 ({e}): pip install 'meshrelay[postgresql]'"
            ) from e
        if threaded:
            return PostgresStore(
                config.store.dsn,
                caps_from(config),
                reactor=reactor,
                writer=ThreadExecutor(reactor, 1, "meshrelay-pg-writer"),
                readers=ThreadExecutor(reactor, READER_THREADS, "meshrelay-pg-readers"),
                metrics=metrics,
            )
        return PostgresStore(config.store.dsn, caps_from(config), reactor=reactor, metrics=metrics)
    raise StoreError(f"store.backend {config.store.backend!r} is not available in this build")
