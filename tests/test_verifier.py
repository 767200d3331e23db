"""The batching signature verifier (meshrelay/verifier.py): verdicts in order, batches while busy."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay.errors import Unavailable
from meshrelay.metrics import Metrics
from meshrelay.verifier import INLINE_INTERVAL, INLINE_MAX_BYTES, Verifier
from tests.helpers import Identity
from tests.test_store import ManualExecutor


class HeldExecutor(ManualExecutor):
    """Runs each submitted job only on ``release`` (test_store's executor); ``broken``: fails them all."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken

    def release(self) -> int:
        if not self.broken:
            return super().release()
        jobs, self.jobs = self.jobs, []
        for _, _, d in jobs:
            d.errback(Failure(RuntimeError("pool gone")))
        return len(jobs)


def signed_items(n: int) -> list[tuple[bytes, bytes, bytes]]:
    """n (key, sig, msg) triples; the odd ones carry another key's signature."""
    items = []
    for i in range(n):
        env = E.parse_envelope(Identity().envelope(Identity(), b"%d" % i), 8192)
        key = env.sender_key if i % 2 == 0 else Identity().key.public_key().public_bytes_raw()
        items.append((key, env.sig_bytes, env.signed))
    return items


class VerifierTests(SynchronousTestCase):
    def test_verify_many_gives_one_verdict_per_item_in_order(self) -> None:
        """verify_many fires once, with each item's own verdict, inline and on an executor."""
        items = signed_items(5)
        expected = [True, False, True, False, True]
        self.assertEqual(self.successResultOf(Verifier().verify_many(items)), expected)
        pool = HeldExecutor()
        d = Verifier(pool).verify_many(items)
        self.assertNoResult(d)
        pool.release()
        self.assertEqual(self.successResultOf(d), expected)
        self.assertEqual(self.successResultOf(Verifier(pool).verify_many([])), [])

    def test_requests_made_while_busy_go_together_and_keep_their_own_verdicts(self) -> None:
        """Singles and groups queued behind a batch in flight leave as one job; each gets its verdicts."""
        pool = HeldExecutor()
        verifier = Verifier(pool, max_inflight=1)
        items = signed_items(6)
        first = verifier.verify(*items[0])
        single = verifier.verify(*items[1])
        group = verifier.verify_many(items[2:5])
        last = verifier.verify(*items[5])
        self.assertEqual(len(pool.jobs), 1)
        pool.release()  # the first job; the three waiting requests leave as the second
        self.assertTrue(self.successResultOf(first))
        self.assertEqual(len(pool.jobs), 1)
        self.assertEqual(len(pool.jobs[0][1][0]), 5)
        pool.release()
        self.assertFalse(self.successResultOf(single))
        self.assertEqual(self.successResultOf(group), [True, False, True])
        self.assertFalse(self.successResultOf(last))

    def test_a_failed_job_is_unavailable_not_forged(self) -> None:
        """When the executor cannot run a job (its child died), every request of it fails with Unavailable."""
        pool = HeldExecutor(broken=True)
        verifier = Verifier(pool)
        items = signed_items(2)
        group = verifier.verify_many([items[0], items[0]])
        pool.release()
        self.assertEqual(self.failureResultOf(group, Unavailable).value.code, "unavailable")
        single = verifier.verify(*items[0])
        pool.release()
        self.failureResultOf(single, Unavailable)


class IdleInlineTests(SynchronousTestCase):
    """With a clock, an idle verifier checks one small signature on the reactor, not too often."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = HeldExecutor()
        self.metrics = Metrics()
        self.verifier = Verifier(self.pool, clock=self.clock, inline_counter=self.metrics.signature_checks_inline_total)
        self.items = signed_items(6)

    def inline_metric(self) -> float:
        return float(self.metrics.registry.get_sample_value("meshrelay_signature_checks_inline_total") or 0)

    def test_an_idle_verifier_checks_a_small_signature_on_the_reactor(self) -> None:
        """Nothing in flight: the verdict is there at once (no job), forged or not."""
        self.assertTrue(self.successResultOf(self.verifier.verify(*self.items[0])))
        self.clock.advance(INLINE_INTERVAL)
        self.assertFalse(self.successResultOf(self.verifier.verify(*self.items[1])))
        self.assertEqual(self.pool.jobs, [])
        self.assertEqual(self.inline_metric(), 2)

    def test_a_second_check_within_the_interval_goes_to_the_executor(self) -> None:
        """At most one check per INLINE_INTERVAL on the reactor: a burst goes to the child."""
        first = self.verifier.verify(*self.items[0])
        second = self.verifier.verify(*self.items[1])
        self.assertTrue(self.successResultOf(first))
        self.assertNoResult(second)
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.release()
        self.assertFalse(self.successResultOf(second))
        self.assertEqual(self.inline_metric(), 1)

    def test_while_a_batch_is_in_flight_everything_queues(self) -> None:
        """A job in flight (or waiting) means load: the next requests join the next batch."""
        self.clock.advance(INLINE_INTERVAL)
        self.verifier.inline_interval = 0.0
        group = self.verifier.verify_many(self.items[:2])  # a group always goes to the executor
        waiting = self.verifier.verify(*self.items[2])
        self.assertNoResult(waiting)
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.release()
        self.assertEqual(self.successResultOf(group), [True, False])
        self.pool.release()
        self.assertTrue(self.successResultOf(waiting))
        self.assertEqual(self.inline_metric(), 0)

    def test_a_big_message_always_goes_to_the_executor(self) -> None:
        """Over INLINE_MAX_BYTES (a 500-id ack is about 34 KB) the check is the child's, idle or not."""
        key = Ed25519PrivateKey.generate()
        msg = b"x" * (INLINE_MAX_BYTES + 1)
        d = self.verifier.verify(key.public_key().public_bytes_raw(), key.sign(msg), msg)
        self.assertNoResult(d)
        self.pool.release()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.inline_metric(), 0)

    def test_without_a_clock_nothing_is_checked_on_the_reactor(self) -> None:
        """The executor-only behaviour (tests, callers that pass no clock) is unchanged."""
        verifier = Verifier(self.pool)
        d = verifier.verify(*self.items[0])
        self.assertNoResult(d)
        self.pool.release()
        self.assertTrue(self.successResultOf(d))
