"""A real ``twistd meshrelay`` node: a follower of its changes feed misses nothing while deposits and acks race."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import NodeProcess, changes_page, free_port
from tests.helpers import Identity

pytestmark = pytest.mark.integration

#: deposits per depositing client, and ack rounds per acking client (bounded load)
DEPOSITS = 120
ACK_ROUNDS = 40
SECRET = "feed-race-secret-0123456789abcdef"


class FeedRaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        # The follower is a peer that never answers (nothing listens at its URL): the node only serves it.
        self.follower_url = f"http://127.0.0.1:{free_port()}"
        self.node = NodeProcess(
            base,
            "a",
            config={"sync": {"interval": 3600, "push_timeout": 1}, "limits": {"per_mailbox_pending": 100000}},
            peers=[{"url": self.follower_url, "secret": SECRET}],
        )
        self.node.start()
        self.addCleanup(self.node.stop)

    def test_follower_sees_every_envelope_never_acked(self) -> None:
        """Two clients deposit, two ack, a follower pages the feed meanwhile: it sees every envelope never acked."""
        node = self.node
        boxes = [Identity(), Identity()]
        deposited: set[str] = set()
        #: ids an ack may have reached (sent, whatever the answer): they may leave the feed unseen
        maybe_acked: set[str] = set()
        lock = threading.Lock()
        done = threading.Event()
        errors: list[BaseException] = []
        seen: set[str] = set()
        state = {"since": 0, "pages": 0}

        def guarded(fn: Any) -> Any:
            def run(*args: Any) -> None:
                try:
                    fn(*args)
                except BaseException as e:  # reported by the test thread
                    errors.append(e)

            return run

        @guarded
        def depositor(k: int) -> None:
            for i in range(DEPOSITS):
                env = Identity().envelope(boxes[i % 2], b"d%d-%d" % (k, i), ts=int(time.time()))
                status, body = node.send(env)
                assert status == 200, (status, body)
                with lock:
                    deposited.add(env["msg_id"])

        @guarded
        def acker(k: int) -> None:
            box = boxes[k]
            for _ in range(ACK_ROUNDS):
                if done.is_set():
                    return
                status, polled = node.poll(box.poll_body(ts=int(time.time()), limit=10))
                assert status == 200, (status, polled)
                ids = [m["msg_id"] for m in polled["messages"]][::2]
                if not ids:
                    continue
                with lock:
                    maybe_acked.update(ids)
                status, body = node.poll(box.poll_body(ts=int(time.time()), ack=ids, limit=1))
                assert status == 200, (status, body)

        def read_page(limit: int) -> dict[str, Any]:
            page = changes_page(node, self.follower_url, SECRET, state["since"], limit)
            for item in page["items"]:
                if "envelope" in item:
                    seen.add(item["envelope"]["msg_id"])
            assert page["next"] >= state["since"]
            state["since"] = page["next"]
            state["pages"] += 1
            return page

        @guarded
        def follower() -> None:
            # Small pages: many page reads race the writes.
            while not done.is_set():
                read_page(3)

        writers = [threading.Thread(target=depositor, args=(k,)) for k in range(2)]
        writers += [threading.Thread(target=acker, args=(k,)) for k in range(2)]
        reader = threading.Thread(target=follower)
        reader.start()
        for t in writers:
            t.start()
        for t in writers:
            t.join(60)
        done.set()
        reader.join(60)
        self.assertFalse(any(t.is_alive() for t in [*writers, reader]))
        self.assertEqual(errors, [])
        # Catch up to the end of the feed (bounded).
        for _ in range(10000):
            if not read_page(500)["more"]:
                break
        self.assertEqual(len(deposited), 2 * DEPOSITS)
        self.assertGreater(len(maybe_acked), 10)
        self.assertGreater(state["pages"], 20)
        never_acked = deposited - maybe_acked
        self.assertEqual(never_acked - seen, set(), node.tail_log(20))
