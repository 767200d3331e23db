"""pytest glue.

- Each session runs in a scratch directory, as trial does with _trial_temp:
  trial's ``TestCase.mktemp()`` returns paths relative to the working
  directory, and without this they would land in the checkout.
- Say whether the PostgreSQL tests run, and how to run them when they do not.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.pgtest import ENV, SKIP_REASON, base_dsn

_skipped: list[int] = [0]


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd() -> Iterator[None]:
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="meshrelay-tests-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(old)


def pytest_report_header(config: Any) -> str:
    if base_dsn() is None:
        return f"PostgreSQL tests: SKIPPED ({ENV} is not set; the end of the run says how to run them)"
    return f"PostgreSQL tests: on ({ENV} is set; one schema per test)"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    _skipped[0] = sum(1 for r in terminalreporter.stats.get("skipped", []) if SKIP_REASON in str(r.longrepr))
    if _skipped[0]:
        terminalreporter.write_line(f"NOTE: {_skipped[0]} tests were skipped. {SKIP_REASON}", yellow=True, bold=True)


class _UnmarkedProcess(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _processes_only_in_integration_tests(request: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process must carry the ``integration`` marker, so the lanes tell the truth.

    In unmarked tests, starting a child through ``subprocess`` or
    ``reactor.spawnProcess`` fails at once, naming the rule.
    """
    if request.node.get_closest_marker("integration") is not None:
        return
    import subprocess

    from twisted.internet import reactor

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _UnmarkedProcess(f"{request.node.nodeid} starts a process: mark it @pytest.mark.integration")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(reactor, "spawnProcess", refuse, raising=False)
