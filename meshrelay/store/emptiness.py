"""Which mailboxes a store's own reads have found empty, with nothing added to them since.

A poll of an empty mailbox is the commonest read a node serves: every long-poll
reads its mailbox up to three times (before it registers, after, and when its
wait ends), and a flood of signed polls for one key (issue 10's ``nonce``
attack) reads the same empty mailbox every time.  When only this process adds
envelopes to the store (SQLite: one process owns it, and every add goes
through its writer), a read that found a mailbox empty stays true until an
add to that mailbox is sent to the writer.  ``EmptyMailboxes`` remembers such
mailboxes (a bounded, least-recently-used set) so the store can answer them
without a trip to a reader thread.

Soundness: a read's snapshot is taken after the read begins.  An add answered
before then committed before the snapshot, so the read saw it.  An add sent
before the read began and not yet answered is *in flight*; a read that begins
then is not trusted (``begin_read`` gives ``None``).  An add sent after the
read began marks the read unclean.  So a clean read that found nothing means
the mailbox had no live envelope at the moment it ended, and it keeps having
none until the next add to it is sent, which forgets the mailbox.  Deletions
(acks, expiry, sweeps) only make an empty mailbox emptier.

Nothing here imports Twisted: the store calls it from its reactor thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

#: mailboxes remembered as empty: about 165 bytes each (the 43-character key, 92 bytes, and its slot,
#: 73 bytes, measured with tracemalloc), so about 1.3 MiB when full
DEFAULT_LIMIT = 8192


class Read:
    """One read of a mailbox in flight; unclean once an add to the mailbox is sent."""

    __slots__ = ("clean",)

    def __init__(self) -> None:
        self.clean = True


class EmptyMailboxes:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._empty: OrderedDict[str, None] = OrderedDict()
        #: mailbox -> adds sent to the writer and not answered yet
        self._adding: dict[str, int] = {}
        #: mailbox -> reads in flight that no add has touched yet
        self._reads: dict[str, set[Read]] = {}

    def __len__(self) -> int:
        return len(self._empty)

    def known_empty(self, mailbox: str) -> bool:
        """Whether ``mailbox`` is known to hold no live envelope."""
        if mailbox not in self._empty:
            return False
        self._empty.move_to_end(mailbox)
        return True

    def begin_read(self, mailbox: str) -> Read | None:
        """A read of ``mailbox`` begins: its token, or None when an add to it is in flight."""
        if mailbox in self._adding:
            return None
        read = Read()
        self._reads.setdefault(mailbox, set()).add(read)
        return read

    def end_read(self, mailbox: str, read: Read | None, empty: bool) -> None:
        """A read ended; ``empty``: it found no live envelope (False also for a failed read)."""
        if read is None:
            return
        reads = self._reads.get(mailbox)
        if reads is not None:
            reads.discard(read)
            if not reads:
                del self._reads[mailbox]
        if empty and read.clean:
            self._empty[mailbox] = None
            self._empty.move_to_end(mailbox)
            while len(self._empty) > self.limit:
                self._empty.popitem(last=False)

    def adding(self, mailboxes: Iterable[str]) -> None:
        """Adds to ``mailboxes`` are being sent to the writer (call ``added`` with the same list once answered)."""
        for mailbox in mailboxes:
            self._adding[mailbox] = self._adding.get(mailbox, 0) + 1
            self._empty.pop(mailbox, None)
            for read in self._reads.pop(mailbox, ()):
                read.clean = False

    def added(self, mailboxes: Iterable[str]) -> None:
        """The writer answered the adds to ``mailboxes`` (committed or not)."""
        for mailbox in mailboxes:
            left = self._adding.get(mailbox, 0) - 1
            if left > 0:
                self._adding[mailbox] = left
            else:
                self._adding.pop(mailbox, None)

    def forget_all(self) -> None:
        """Trust nothing known so far (a write this class cannot see into)."""
        self._empty.clear()
        for reads in self._reads.values():
            for read in reads:
                read.clean = False
        self._reads.clear()
