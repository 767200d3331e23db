"""pytest glue: run each session in a scratch directory, as trial does with _trial_temp.

trial's ``TestCase.mktemp()`` returns paths relative to the working directory;
without this they would land in the checkout.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd() -> Iterator[None]:
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="meshrelay-tests-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(old)
