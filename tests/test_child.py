"""Helper child processes (meshrelay/child.py): the verifier's ProcessExecutor on a real child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meshrelay import child
from meshrelay.errors import Unavailable
from meshrelay.sigcheck import verify_all
from meshrelay.verifier import Verifier
from tests.test_verifier import signed_items

pytestmark = pytest.mark.integration


def start_executor(case: TestCase) -> child.ProcessExecutor:
    """A started ProcessExecutor on a real child, stopped when ``case`` ends."""
    executor = child.ProcessExecutor(reactor, "test helper", Unavailable)
    executor.start()
    case.addCleanup(executor.child.stop)
    return executor


def explode(message: str) -> None:
    raise ValueError(message)


class ProcessExecutorTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.executor = start_executor(self)

    @inlineCallbacks
    def test_jobs_run_in_the_child_in_order(self) -> Any:
        """Verdicts come back from another process, in the order the jobs were sent."""
        items = signed_items(6)
        verifier = Verifier(self.executor, max_inflight=2)
        answers = [verifier.verify_many(items[:3]), verifier.verify(*items[3]), verifier.verify_many(items[4:])]
        self.assertEqual((yield answers[0]), [True, False, True])
        self.assertFalse((yield answers[1]))
        self.assertEqual((yield answers[2]), [True, False])
        pid = yield self.executor.run(os.getpid)
        self.assertNotEqual(pid, os.getpid())
        self.assertEqual(pid, self.executor.child.pid)

    @inlineCallbacks
    def test_an_exception_in_a_job_fails_that_job_only(self) -> Any:
        """A job that raises answers the owner's error; the child keeps serving."""
        failed = self.executor.run(explode, "no good")
        ok = self.executor.run(verify_all, signed_items(1))
        with self.assertRaises(Unavailable) as raised:
            yield failed
        self.assertIn("ValueError: no good", str(raised.exception))
        self.assertEqual((yield ok), [True])

    @inlineCallbacks
    def test_a_dead_child_fails_its_jobs_unavailable_and_a_new_one_takes_over(self) -> Any:
        """Killed mid-job: the verification is Unavailable (503), not forged; after RESPAWN_DELAY a new child."""
        first = self.executor.child.pid
        verifier = Verifier(self.executor)
        pending = verifier.verify_many(signed_items(400))
        os.kill(first, signal.SIGKILL)
        with self.assertRaises(Unavailable):
            yield pending
        with self.assertRaises(Unavailable):  # restarting
            yield verifier.verify_many(signed_items(1))
        yield deferLater(reactor, child.RESPAWN_DELAY + 0.2, lambda: None)
        self.assertEqual((yield verifier.verify_many(signed_items(2))), [True, False])
        self.assertNotEqual(self.executor.child.pid, first)
        self.assertEqual(self.executor.child.spawned, 2)


def echo(value: bytes) -> int:
    return len(value)


class _FakeWriter:
    """What write_to_child reads of Twisted's stdin writer (abstract.FileDescriptor's buffer state)."""

    def __init__(self, fd: int, buffered: bytes = b"") -> None:
        self.fd = fd
        self.dataBuffer = buffered
        self.offset = 0
        self._tempDataLen = 0
        self.connected = 1
        self.disconnecting = False

    def fileno(self) -> int:
        return self.fd


class _FakeTransport:
    def __init__(self, writer: _FakeWriter) -> None:
        self.pipes = {0: writer}
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class WriteToChildTests(TestCase):
    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        os.set_blocking(w, False)
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        return r, w

    def test_an_idle_pipe_is_written_at_once(self) -> None:
        r, w = self.pipe()
        transport = _FakeTransport(_FakeWriter(w))
        child.write_to_child(transport, b"frame")
        self.assertEqual(os.read(r, 100), b"frame")
        self.assertEqual(transport.written, [])

    def test_behind_unsent_data_the_frame_goes_through_twisted(self) -> None:
        """Twisted still holds bytes for the pipe: writing past them would reorder the frames."""
        r, w = self.pipe()
        transport = _FakeTransport(_FakeWriter(w, buffered=b"earlier"))
        child.write_to_child(transport, b"frame")
        self.assertEqual(transport.written, [b"frame"])
        os.write(w, b"x")
        self.assertEqual(os.read(r, 100), b"x")  # nothing of the frame went into the pipe

    def test_what_does_not_fit_goes_through_twisted_in_order(self) -> None:
        r, w = self.pipe()
        transport = _FakeTransport(_FakeWriter(w))
        big = bytes(range(256)) * 2048  # 512 KiB: more than a pipe holds
        child.write_to_child(transport, big)
        (rest,) = transport.written
        self.assertGreater(len(rest), 0)
        taken = b""
        while len(taken) < len(big) - len(rest):
            taken += os.read(r, 1 << 16)
        self.assertEqual(taken + rest, big)

    def test_a_closed_pipe_is_left_to_twisted(self) -> None:
        r, w = os.pipe()
        os.close(r)
        self.addCleanup(os.close, w)
        transport = _FakeTransport(_FakeWriter(w))
        child.write_to_child(transport, b"frame")  # EPIPE: no exception here
        self.assertEqual(transport.written, [b"frame"])


class BigFramesTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_frames_larger_than_the_pipe_arrive_whole_and_in_order(self) -> Any:
        executor = start_executor(self)
        sizes = [300_000, 10, 200_000, 1, 150_000, 70_000, 5]
        answers = [executor.run(echo, b"x" * n) for n in sizes]
        got = []
        for d in answers:
            got.append((yield d))
        self.assertEqual(got, sizes)


#: top-level packages a helper child must not load: the node's framework and its web and config layers
NODE_ONLY = ("twisted", "klein", "treq", "werkzeug", "OpenSSL", "prometheus_client", "zope")
NODE_MODULES = ("meshrelay.config", "meshrelay.web", "meshrelay.node", "meshrelay.relay", "meshrelay.peernet")


def node_only(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in NODE_ONLY or m in NODE_MODULES)


class LeanChildTests(TestCase):
    """The helper children load no Twisted, web or config code: they are ready sooner after a (re)start.

    Importing the node's modules took a child about 0.3-0.5 s on this machine; a store writer
    that is not ready holds back every write of a node that just started (a catch-up, a restart
    under load).
    """

    timeout = 60

    @inlineCallbacks
    def test_the_verifier_child_runs_without_the_node_modules(self) -> Any:
        """A real verifier child, after a verification: what it has loaded (asked with a job of its own)."""
        executor = start_executor(self)
        self.assertEqual((yield executor.run(verify_all, signed_items(2))), [True, False])
        loaded = yield executor.run(eval, "sorted(__import__('sys').modules)")
        self.assertIn("meshrelay.sigcheck", loaded)
        self.assertIn("nacl.bindings", loaded)
        self.assertEqual(node_only(loaded), [])
        # Not even the envelope codec: its ``cryptography`` bindings alone held about 14 MB.
        self.assertEqual([m for m in loaded if m.split(".")[0] == "cryptography" or m == "meshrelay.envelope"], [])

    def test_the_writer_child_imports_without_the_node_modules(self) -> None:
        """The writer child's entry point and the store core it runs, imported as the child imports them."""
        program = (
            "import sys; sys.path[:] = sys.argv[1].split(__import__('os').pathsep); "
            "import meshrelay.store.writer_child, meshrelay.store.sqlite_core; "
            "print(' '.join(sorted(sys.modules)))"
        )
        path = os.pathsep.join(child.child_import_path())
        out = subprocess.run([sys.executable, "-I", "-c", program, path], capture_output=True, check=True, timeout=60)
        loaded = out.stdout.decode().split()
        self.assertIn("meshrelay.store.sqlite_core", loaded)
        self.assertIn("sqlite3", loaded)
        self.assertEqual(node_only(loaded), [])


class ProcessEndedTests(TestCase):
    def test_the_owner_learns_of_the_exit_on_the_next_turn_not_inside_the_reaping(self) -> None:
        """Twisted reaps from a snapshot of its processes: the owner's reaction must wait a turn."""
        from twisted.internet.task import Clock
        from twisted.python.failure import Failure

        ended: list[Any] = []

        class Owner:
            reactor = Clock()

            def _ended(self, proto: Any, reason: Failure) -> None:
                ended.append((proto, reason))

        owner = Owner()
        proto = child._ChildProtocol(owner)  # type: ignore[arg-type]
        reason = Failure(RuntimeError("exited"))
        proto.processEnded(reason)
        self.assertEqual(ended, [])
        owner.reactor.advance(0)
        self.assertEqual(ended, [(proto, reason)])
