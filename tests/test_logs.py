"""Logging: JSON lines, the twistd observer wiring, the config summary, throttled cap lines."""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import logs
from meshrelay.config import to_toml
from meshrelay.status import RateSampler
from meshrelay.tap import Options, makeService
from tests.harness import NodeProcess
from tests.helpers import Identity, MemNode


class JSONLinesTests(SynchronousTestCase):
    def test_one_json_object_per_line(self) -> None:
        """Each event is one line of JSON with time, level, namespace, message and its fields."""
        out = io.StringIO()
        log = Logger(namespace="meshrelay.test", observer=logs.JSONLinesObserver(out))
        log.info("stored {n} envelopes for {who}", n=3, who="x\ny", obj=object())
        log.warn("second")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "meshrelay.test")
        self.assertEqual(first["message"], "stored 3 envelopes for x\ny")
        self.assertEqual(first["n"], 3)
        self.assertTrue(first["time"].endswith("Z"))
        self.assertIn("object object", first["obj"])
        self.assertEqual(json.loads(lines[1])["level"], "warn")

    def test_failure_has_traceback(self) -> None:
        """A logged failure carries its traceback in the failure field."""
        out = io.StringIO()
        log = Logger(namespace="t", observer=logs.JSONLinesObserver(out))
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.failure("it broke", Failure())
        line = json.loads(out.getvalue())
        self.assertEqual(line["level"], "critical")
        self.assertIn("ValueError: bad thing", line["failure"])

    def test_observer_factory_follows_the_environment(self) -> None:
        """meshrelay.logs.observer writes JSON lines when $MESHRELAY_LOG_FORMAT says json, text otherwise."""
        old = os.environ.get("MESHRELAY_LOG_FORMAT")
        self.addCleanup(
            lambda: (
                os.environ.pop("MESHRELAY_LOG_FORMAT", None)
                if old is None
                else os.environ.__setitem__("MESHRELAY_LOG_FORMAT", old)
            )
        )
        os.environ["MESHRELAY_LOG_FORMAT"] = "json"
        self.assertIsInstance(logs.observer(), logs.JSONLinesObserver)
        for value in ("text", "xml", ""):
            os.environ["MESHRELAY_LOG_FORMAT"] = value
            self.assertNotIsInstance(logs.observer(), logs.JSONLinesObserver)


class TwistdWiringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def service(self, log_format: str, twistd: dict[str, Any] | None = None) -> tuple[Any, list[dict[str, Any]]]:
        path = os.path.join(self.dir, "n.toml")
        raw = {
            "node": {"data_dir": os.path.join(self.dir, "data"), "log_format": log_format},
            "peers": [{"url": "http://b.test", "secret": "very-secret-value-123"}],
        }
        with open(path, "w") as fh:
            fh.write(to_toml(raw))
        opts = Options()
        opts.parseOptions(["--config", path])
        opts.parent = twistd if twistd is not None else {"nodaemon": True, "logfile": None, "syslog": False}  # type: ignore[attr-defined]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        top = makeService(opts, MemoryReactorClock())
        self.addCleanup(lambda: top.getServiceNamed("meshrelay-node").store.close())
        return top, events

    def test_json_format_installs_observer_on_application(self) -> None:
        """log_format = "json" makes twistd's application use the JSON-lines observer."""
        top, _ = self.service("json")
        app = Application("meshrelay")
        top.setServiceParent(app)
        self.assertIsInstance(ILogObserver(app), logs.JSONLinesObserver)

    def test_json_format_writes_to_the_twistd_logfile(self) -> None:
        """Without -n, JSON lines go where twistd would write: --logfile."""
        logfile = os.path.join(self.dir, "node.log")
        top, _ = self.service("json", {"nodaemon": False, "logfile": logfile, "syslog": False})
        observer = top.log_observer
        Logger(namespace="t", observer=observer).info("hello {x}", x=1)
        observer.stream.close()
        with open(logfile) as fh:
            self.assertEqual(json.loads(fh.read())["message"], "hello 1")

    def test_text_format_keeps_twistd_observer(self) -> None:
        """The default text format leaves twistd's own observer in place; so does --syslog."""
        top, _ = self.service("text")
        app = Application("meshrelay")
        top.setServiceParent(app)
        self.assertIsNone(app.getComponent(ILogObserver, None))
        top2, _ = self.service("json", {"nodaemon": True, "syslog": True})
        self.assertIsNone(top2.log_observer)

    def test_config_summary_masks_secrets(self) -> None:
        """makeService logs one config line naming the peers; no secret appears in any field."""
        _, events = self.service("text")
        summaries = [e for e in events if str(e.get("log_format", "")).startswith("config {source}")]
        self.assertEqual(len(summaries), 1)
        self.assertIn("http://b.test", summaries[0]["peers"])
        self.assertNotIn("very-secret-value-123", json.dumps(summaries[0], default=str))
        self.assertEqual(summaries[0]["config"]["peers"][0]["secret"], "***")

    def test_sampler_is_part_of_the_service_tree(self) -> None:
        """The rate sampler for /status runs as a child of the twistd service."""
        top, _ = self.service("text")
        self.assertIsInstance(top.getServiceNamed("meshrelay-rates"), RateSampler)


class CapLogTests(SynchronousTestCase):
    def test_cap_hits_are_logged_once_a_minute(self) -> None:
        """Hitting the per-sender cap logs one 'cap hit' line, then one a minute with a count."""
        mem = MemNode(self.mktemp(), per_sender_pending=1)
        self.addCleanup(mem.stop)
        events: list[dict[str, Any]] = []
        mem.relay.log = Logger(namespace="meshrelay.relay.Relay", observer=events.append)  # type: ignore[misc]
        alice, bob = Identity(), Identity()
        mem.send(alice.envelope(bob, b"1"))
        for i in range(5):
            self.assertEqual(mem.send(alice.envelope(bob, b"%d" % (i + 2)))[0], 429)
        caps = [e for e in events if e.get("cap") == "per_sender_pending"]
        self.assertEqual(len(caps), 1)
        self.assertEqual(caps[0]["log_level"], LogLevel.info)
        mem.clock.advance(61)
        mem.send(alice.envelope(bob, b"late", ts=int(mem.clock.seconds())))
        caps = [e for e in events if e.get("cap") == "per_sender_pending"]
        self.assertEqual([e["folded"] for e in caps], [0, 4])


@pytest.mark.integration
class JSONLogsOfARealNodeTests(SynchronousTestCase):
    def test_twistd_writes_json_lines(self) -> None:
        """A node run by twistd with log_format = "json" writes only JSON lines, secrets masked."""
        node = NodeProcess(
            os.path.abspath(self.mktemp()),
            "n",
            config={"node": {"log_format": "json"}},
            peers=[{"url": "http://127.0.0.1:9", "secret": "do-not-log-this-secret"}],
        )
        node.start()
        try:
            status, _ = node.send(Identity().envelope(Identity(), ts=int(time.time())))
            self.assertEqual(status, 200)
        finally:
            node.stop()
        with open(node.log_path, encoding="utf-8") as fh:
            text = fh.read()
        self.assertNotIn("do-not-log-this-secret", text)
        lines = [json.loads(line) for line in text.splitlines()]
        messages = [line["message"] for line in lines]
        self.assertTrue(any(m.startswith("config ") and "http://127.0.0.1:9" in m for m in messages), messages)
        self.assertTrue(any("node http://127.0.0.1:" in m and "started" in m for m in messages), messages)
        self.assertTrue(any(m.startswith("new store created") for m in messages), messages)
        self.assertTrue(all({"time", "level", "namespace", "message"} <= set(line) for line in lines))
