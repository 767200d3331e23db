"""Helper child processes (meshrelay/child.py): the verifier's ProcessExecutor on a real child."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meshrelay import child
from meshrelay.errors import Unavailable
from meshrelay.verifier import Verifier, _verify_all
from tests.test_verifier import signed_items

pytestmark = pytest.mark.integration


def explode(message: str) -> None:
    raise ValueError(message)


class ProcessExecutorTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.executor = child.ProcessExecutor(reactor, "test helper", Unavailable)
        self.executor.start()
        self.addCleanup(self.executor.child.stop)

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
        ok = self.executor.run(_verify_all, signed_items(1))
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
