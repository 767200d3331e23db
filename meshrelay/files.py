"""Private files and directories: mode 0600/0700 whatever the umask, secrets never half-written.

- :func:`write_private_file`, the one writer for every secret the project puts
  on disk: identity key files (:meth:`meshrelay.client.Identity.save`), peer
  secrets (``meshrelay gen-secret``, the demo mesh).
- :func:`private_dir` and :func:`private_file` for the node's data: the SQLite
  store holds every pending envelope and the nonces, and nobody but the node's
  user has any business reading it.  ``os.makedirs``/``open`` modes are masked
  by the umask (a 022 umask gave 0755/0644), so the modes are set explicitly,
  and an existing directory or file that is more open is tightened.  SQLite
  creates its ``-wal`` and ``-shm`` files with the database file's mode, so a
  0600 database keeps them 0600 too.
"""

from __future__ import annotations

import os
import stat
import tempfile

from twisted.logger import Logger

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600

log = Logger()


class PrivateFileError(Exception):
    """The file could not be written; ``str(e)`` is one line naming it."""


class PrivateFileExists(PrivateFileError):
    """The file exists and replacing it was not asked for."""


def write_private_file(path: str, text: str, force: bool = False) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically; refuse to replace a file unless ``force``.

    The text goes to a temporary file in the same directory (created 0600,
    whatever the umask), is synced, then takes the name: ``link`` when the
    name must be new (it fails if the name appeared meanwhile), ``replace``
    with ``force``.  Missing directories are created 0700.
    """
    path = os.path.expanduser(path)
    exists = f"{path} already exists (use --force to replace it)"
    if os.path.lexists(path) and not force:
        raise PrivateFileExists(exists)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=PRIVATE_DIR, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".meshrelay-", dir=directory)
    except OSError as e:
        raise PrivateFileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, PRIVATE_FILE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, FileExistsError):
            raise PrivateFileExists(exists) from None
        raise PrivateFileError(f"cannot write {path}: {e.strerror or e}") from None


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
