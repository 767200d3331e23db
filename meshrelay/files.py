"""Private files: written whole, mode 0600, never half-written or silently replaced.

The one writer for every secret the project puts on disk: identity key files
(:meth:`meshrelay.client.Identity.save`), peer secrets (``meshrelay
peer-secret``, the demo mesh).
"""

from __future__ import annotations

import os
import tempfile


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
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".meshrelay-", dir=directory)
    except OSError as e:
        raise PrivateFileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)
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
