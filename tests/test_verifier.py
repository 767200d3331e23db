"""The batching signature verifier (meshrelay/verifier.py): verdicts in order, batches while busy."""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay.errors import Unavailable
from meshrelay.verifier import Verifier
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
