"""Private files for the node's data: directory 0700, files 0600, whatever the umask.

The SQLite store holds every pending envelope and the nonces; nobody but the
node's user has any business reading it.  ``os.makedirs``/``open`` modes are
masked by the umask (a 022 umask gave 0755/0644), so the modes are set
explicitly, and an existing directory or file that is more open is tightened.
SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode,
so a 0600 database keeps them 0600 too.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600

log = Logger()


def _set_mode(path: str, mode: int) -> None:
    try:
        current = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if current != mode:
        os.chmod(path, mode)


def private_dir(path: str) -> None:
    """Create ``path`` (and parents) if needed and make it mode 0700.

    A directory this user may not chmod (another owner) is left as it is, with
    one warning: the files inside are still 0600.
    """
    os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
    try:
        _set_mode(path, PRIVATE_DIR)
    except PermissionError as e:
        log.warn("cannot make {path} private (mode 0700): {err}", path=path, err=e.strerror or e)


def private_file(path: str, create: bool = False) -> None:
    """Make ``path`` mode 0600 (creating it empty first when ``create``); a missing file is left missing."""
    if create:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    _set_mode(path, PRIVATE_FILE)
