"""The data directory is 0700 and the store's files 0600, whatever the umask (issue 10 item 6)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.store.sqlite import DB_NAME
from tests.helpers import Identity, MemNode


class FileModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self.dir = os.path.abspath(self.mktemp())

    def assertPrivate(self) -> None:
        self.assertEqual(os.stat(self.dir).st_mode & 0o777, 0o700)
        names = sorted(os.listdir(self.dir))
        self.assertIn(DB_NAME, names)
        for name in names:
            self.assertEqual(os.stat(os.path.join(self.dir, name)).st_mode & 0o777, 0o600, name)

    def use(self) -> None:
        mem = MemNode(self.dir)
        self.addCleanup(mem.stop)
        self.assertEqual(mem.send(Identity().envelope(Identity(), ts=int(mem.clock.seconds())))[0], 200)
        self.assertEqual(mem.poll(Identity())[0], 200)

    def test_new_store_is_private_under_umask_000(self) -> None:
        """A store created with umask 000 has a 0700 directory and 0600 database, -wal and -shm."""
        self.use()
        self.assertIn(DB_NAME + "-wal", os.listdir(self.dir))
        self.assertPrivate()

    def test_existing_open_modes_are_tightened(self) -> None:
        """A data dir and database left 0777/0666 by an older version are made 0700/0600 at start."""
        os.makedirs(self.dir, mode=0o777)
        for suffix in ("", "-wal", "-shm"):
            open(os.path.join(self.dir, DB_NAME + suffix), "w").close()
            os.chmod(os.path.join(self.dir, DB_NAME + suffix), 0o666)
        os.chmod(self.dir, 0o777)
        self.use()
        self.assertPrivate()
