"""The twistd plugin and makeService, driven with a MemoryReactor."""

from __future__ import annotations

import gc
import io
import os
import sqlite3
import sys
import threading

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.store import writer_child
from meshrelay.store.base import Caps
from meshrelay.store.sqlite import DB_NAME, WriterCore, migrate
from meshrelay.store.writer_child import child_main
from meshrelay.store.writer_process import _caps_argv
from meshrelay.tap import MeshrelayService, Options, makeService


class TapTests(SynchronousTestCase):
    def options(self, *argv: str) -> Options:
        opts = Options()
        opts.parseOptions(list(argv))
        return opts

    def listen(self, svc: object) -> None:
        # Start only the listeners: the node's worker threads need a real reactor.
        for name in ("public", "admin"):
            child = svc.getServiceNamed(name)  # type: ignore[attr-defined]
            child.startService()
            self.addCleanup(child.stopService)
        node = svc.getServiceNamed("meshrelay-node")  # type: ignore[attr-defined]
        self.addCleanup(node.store._wconn.close)

    def config_file(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def test_plugin_is_found(self) -> None:
        """twistd finds a service maker called meshrelay."""
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("meshrelay", names)

    def test_defaults_listen_on_loopback(self) -> None:
        """With no options the node listens on 127.0.0.1:8080 and the admin on 127.0.0.1:9090."""
        reactor = MemoryReactorClock()
        data = os.path.abspath(self.mktemp())
        svc = makeService(self.options("--data-dir", data), reactor)
        self.listen(svc)
        ports = sorted((port, iface) for port, _factory, _backlog, iface in reactor.tcpServers)
        self.assertEqual(ports, [(8080, "127.0.0.1"), (9090, "127.0.0.1")])
        self.assertTrue(os.path.exists(os.path.join(data, "meshrelay.sqlite3")))

    def test_file_and_overrides(self) -> None:
        """--config reads the file; --listen and --admin-listen override it."""
        data = os.path.abspath(self.mktemp())
        path = self.config_file(
            f'[node]\nlisten = "tcp:7001:interface=127.0.0.1"\nadmin_listen = "tcp:7002:interface=127.0.0.1"\n'
            f'data_dir = "{data}"\n'
        )
        reactor = MemoryReactorClock()
        svc = makeService(self.options("--config", path, "--listen", "tcp:7003:interface=127.0.0.1"), reactor)
        self.listen(svc)
        self.assertEqual(sorted(p[0] for p in reactor.tcpServers), [7002, 7003])

    def assertExitsWithOneLine(self, opts: Options, needle: str) -> None:
        err = io.StringIO()
        old, sys.stderr = sys.stderr, err
        try:
            with self.assertRaises(SystemExit) as cm:
                makeService(opts, MemoryReactorClock())
        finally:
            sys.stderr = old
        self.assertEqual(cm.exception.code, 1)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(needle, lines[0])

    def test_bad_config_exits_with_one_line(self) -> None:
        """An unknown key, a wrong type or a missing secret ends makeService with one line naming the key."""
        self.assertExitsWithOneLine(self.options("--config", self.config_file("[node]\nbogus = 1\n")), "node.bogus")
        self.assertExitsWithOneLine(
            self.options("--config", self.config_file("[sync]\ninterval = 'x'\n")), "sync.interval"
        )
        self.assertExitsWithOneLine(
            self.options("--config", self.config_file('[[peers]]\nurl = "http://b.test"\n')), "peers[0].secret"
        )
        self.assertExitsWithOneLine(self.options("--config", "/nonexistent.toml"), "/nonexistent.toml")
        self.assertExitsWithOneLine(self.options("--listen", "nonsense:1"), "node.listen")

    def test_unusable_data_dir_exits_with_one_line(self) -> None:
        """A data dir that cannot be created ends makeService with one line naming it."""
        blocker = os.path.abspath(self.mktemp())
        open(blocker, "w").close()
        self.assertExitsWithOneLine(self.options("--data-dir", os.path.join(blocker, "sub")), "sub")


class SchemaVersionTests(SynchronousTestCase):
    def test_newer_schema_refuses_to_start(self) -> None:
        """A store whose schema is newer than this code is refused with one line, not run."""
        from meshrelay.store.base import Caps, StoreError
        from meshrelay.store.sqlite import SQLiteStore

        data = os.path.abspath(self.mktemp())
        store = SQLiteStore(data, Caps())
        store._wconn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        store._wconn.close()
        with self.assertRaises(StoreError) as cm:
            SQLiteStore(data, Caps())
        self.assertIn("newer than this meshrelay knows", str(cm.exception))


class StartUpTests(SynchronousTestCase):
    """What the node and its store writer do once started, so that they stall their work less.

    Both keep their start-up objects out of the cyclic GC's full passes: a full collection
    walked every object the process had built (about 65,000 in a node); under issue 10's
    attack soak a node ran one every ten seconds or so, each stopping its reactor for about
    40 ms.  ``gc.freeze`` after start-up leaves those passes the objects made since.  And the
    writer runs as ``SCHED_BATCH`` (see ``writer_child.no_wakeup_preemption``).
    """

    def record(self) -> list[str]:
        calls: list[str] = []
        self.patch(gc, "collect", lambda *a: calls.append("collect") or 0)
        self.patch(gc, "freeze", lambda: calls.append("freeze"))
        return calls

    def test_the_node_service_freezes_what_start_up_built(self) -> None:
        calls = self.record()
        top = MeshrelayService()
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(calls, ["collect", "freeze"])

    def run_child(self) -> None:
        """child_main in this process, on a fresh database, with an empty stdin (it stops at once)."""
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        conn = sqlite3.connect(os.path.join(data, DB_NAME))
        migrate(conn)
        conn.close()

        class Std:
            def __init__(self, raw: bytes) -> None:
                self.buffer = io.BytesIO(raw)

        # no checkpointer thread: the child reads EOF at once and stops
        self.patch(WriterCore, "run_checkpointer", lambda *a: threading.Event())
        self.patch(sys, "stdin", Std(b""))
        self.patch(sys, "stdout", Std(b""))
        self.assertEqual(child_main([os.path.join(data, DB_NAME), "normal", *_caps_argv(Caps())]), 0)

    def test_the_writer_child_freezes_what_it_loaded(self) -> None:
        calls = self.record()
        self.patch(writer_child, "no_wakeup_preemption", lambda: None)
        self.run_child()
        self.assertEqual(calls, ["collect", "freeze"])

    def test_the_writer_child_does_not_preempt_the_reactor_that_wakes_it(self) -> None:
        """The writer runs as SCHED_BATCH: woken by the node's pipe write, it does not take the node's core from it."""
        self.record()
        policies: list[tuple[int, int]] = []
        self.patch(os, "sched_setscheduler", lambda pid, policy, param: policies.append((pid, policy)))
        self.run_child()
        self.assertEqual(policies, [(0, os.SCHED_BATCH)])
