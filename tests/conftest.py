"""pytest hooks: say whether the PostgreSQL tests run, and how to run them when they do not."""

from __future__ import annotations

from typing import Any

from tests.pgtest import ENV, SKIP_REASON, base_dsn

_skipped: list[int] = [0]


def pytest_report_header(config: Any) -> str:
    if base_dsn() is None:
        return f"PostgreSQL tests: SKIPPED ({ENV} is not set; the end of the run says how to run them)"
    return f"PostgreSQL tests: on ({ENV} is set; one schema per test)"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    _skipped[0] = sum(1 for r in terminalreporter.stats.get("skipped", []) if SKIP_REASON in str(r.longrepr))


def pytest_unconfigure(config: Any) -> None:
    # After the summary line, so it is the last thing a reader sees.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _skipped[0]:
        reporter.write_line(f"NOTE: {_skipped[0]} tests were skipped. {SKIP_REASON}", yellow=True, bold=True)
