"""Log output for operators: text or JSON lines, and a throttle for noisy events.

meshrelay logs with :mod:`twisted.logger` everywhere.  ``twistd`` decides where
the lines go; this module decides their shape:

- ``[node] log_format = "json"`` makes ``twistd meshrelay`` write one JSON object
  per line (``time``, ``level``, ``namespace``, ``message``, the event's own
  fields, and ``failure`` with the traceback when there is one) to the same
  place twistd would write text: stdout with ``-n``, else ``--logfile``
  (default ``twistd.log``).  ``makeService`` installs it as the application's
  log observer (:class:`~meshrelay.tap.MeshrelayService`).
- ``twistd --logger meshrelay.logs.observer ...`` uses :func:`observer`: stdout,
  in the format ``$MESHRELAY_LOG_FORMAT`` names (text by default), whatever the
  config says.  No module state: the config's format reaches twistd only as the
  application's observer component.
- :class:`Aggregator` keeps a flood of per-request lines (bad peer HMACs,
  refused requests, a sender hammering a cap, a failing store) to one line per
  reason per interval: the first event of a quiet reason is logged at once;
  the ones that follow within ``interval`` are counted, and when the interval
  ends one line reports how many there were (with the last one's details).
  Every per-request log line of the node goes through one of these.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import IO, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent, textFileLogObserver
from twisted.python.failure import Failure
from zope.interface import implementer

FORMATS = ("text", "json")


#: event keys that are plumbing, not fields
_SKIP = frozenset(("format", "message", "isError", "printed", "time", "system", "failure", "why", "log_trace"))


def env_format() -> str:
    """The format ``$MESHRELAY_LOG_FORMAT`` names ("text" when unset or unknown)."""
    env = os.environ.get("MESHRELAY_LOG_FORMAT", "").strip().lower()
    return env if env in FORMATS else "text"


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth < 4 and isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value[:100]]
    if depth < 4 and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def event_as_json(event: LogEvent) -> dict[str, Any]:
    """One log event as a flat JSON-able object."""
    ts = event.get("log_time") or 0.0
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(ts, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": (formatEvent(event) or "").strip(),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in out:
            continue
        out[key] = _jsonable(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["failure"] = failure.getTraceback()
        except Exception:
            out["failure"] = repr(failure)
    return out


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to a text stream."""

    def __init__(self, stream: IO[str] | Any) -> None:
        self.stream = stream

    def __call__(self, event: LogEvent) -> None:
        try:
            line = json.dumps(event_as_json(event), ensure_ascii=False, separators=(",", ":"), default=str)
        except Exception as e:  # a log line must never break the caller
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self.stream.write(line + "\n")
        self.stream.flush()


def make_observer(fmt: str, stream: IO[str] | Any) -> Any:
    """An observer writing ``fmt`` ("text" or "json") to ``stream``."""
    return JSONLinesObserver(stream) if fmt == "json" else textFileLogObserver(stream)


def observer() -> Any:
    """Observer factory for ``twistd --logger meshrelay.logs.observer``: stdout, ``$MESHRELAY_LOG_FORMAT``."""
    return make_observer(env_format(), sys.stdout)


def twistd_destination(twistd_options: Any) -> Any:
    """Where twistd itself would send text logs, given its ServerOptions: a stream or LogFile."""
    get = getattr(twistd_options, "get", None)
    logfile = (get("logfile") if get else None) or ""
    nodaemon = bool(get("nodaemon")) if get else True
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile or "twistd.log")


def observer_for_twistd(fmt: str, twistd_options: Any) -> Any | None:
    """The observer to install for ``fmt`` under twistd, or None to keep twistd's own.

    Text keeps twistd's default observer; so does ``--syslog`` (twistd's syslog
    observer is used as configured).
    """
    if fmt != "json":
        return None
    get = getattr(twistd_options, "get", None)
    if get is not None and get("syslog"):
        return None
    return JSONLinesObserver(twistd_destination(twistd_options))


class _Window:
    __slots__ = ("log", "level", "fmt", "fields", "folded", "timer")

    def __init__(self, log: Logger, level: LogLevel, fmt: str, fields: dict[str, Any]) -> None:
        self.log = log
        self.level = level
        self.fmt = fmt
        self.fields = fields
        self.folded = 0
        self.timer: IDelayedCall | None = None


class Aggregator:
    """One log line per reason per ``interval`` seconds, with counts (on the injected clock).

    ``emit(log, key, fmt, ...)`` logs at once when ``key`` has been quiet for
    ``interval``; otherwise it only counts.  When an interval in which events
    were counted ends, one line says how many (``folded``), formatted with the
    last event's fields, and a new interval starts; an interval that ends with
    nothing counted closes quietly.  At most ``max_keys`` reasons are tracked
    at once; past that, events of new reasons are counted under ``"other"``.
    Keys must come from code, never from request data.
    """

    def __init__(self, clock: IReactorTime, interval: float = 60.0, max_keys: int = 256) -> None:
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}
        self.other = 0

    def emit(
        self,
        log: Logger,
        key: str,
        fmt: str,
        level: LogLevel = LogLevel.info,
        failure: Failure | None = None,
        **fields: Any,
    ) -> bool:
        """Log or count one event; True when a line was written now."""
        window = self._windows.get(key)
        if window is not None:
            window.folded += 1
            window.fields = fields
            return False
        if len(self._windows) >= self.max_keys:
            self.other += 1
            return False
        window = _Window(log, level, fmt, fields)
        self._windows[key] = window
        window.timer = self.clock.callLater(self.interval, self._close, key)
        if failure is not None:
            log.failure(fmt, failure, level, folded=0, aggregated=key, **fields)
        else:
            log.emit(level, fmt, folded=0, aggregated=key, **fields)
        return True

    def _report(self, key: str, window: _Window) -> None:
        folded, window.folded = window.folded, 0
        window.log.emit(
            window.level,
            window.fmt + " ({folded} more like this in the last {interval:g}s)",
            folded=folded,
            interval=self.interval,
            aggregated=key,
            **window.fields,
        )

    def _close(self, key: str) -> None:
        window = self._windows.get(key)
        if window is None:
            return
        if not window.folded:
            del self._windows[key]
            return
        self._report(key, window)
        window.timer = self.clock.callLater(self.interval, self._close, key)

    def pending(self, key: str) -> int:
        """Events of ``key`` counted and not reported yet."""
        window = self._windows.get(key)
        return window.folded if window is not None else 0

    def stop(self) -> None:
        """Report what is counted and cancel the timers (the node is stopping)."""
        windows, self._windows = self._windows, {}
        for key, window in windows.items():
            if window.timer is not None and window.timer.active():
                window.timer.cancel()
            if window.folded:
                self._report(key, window)


class AggregatingLogger(Logger):
    """A :class:`Logger` whose every event goes through an :class:`Aggregator`, keyed by its format.

    For code that logs per operation and has no aggregator of its own (the
    stores: a failing disk fails every request's write); the node hands its
    store one of these in place of the store's own logger.
    """

    def __init__(self, inner: Logger, agg: Aggregator, prefix: str = "") -> None:
        super().__init__(namespace=inner.namespace, source=inner.source, observer=inner.observer)
        self._inner = inner
        self._agg = agg
        self._prefix = prefix

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        failure = kwargs.pop("log_failure", None)
        fmt = format or ""
        self._agg.emit(self._inner, self._prefix + fmt, fmt, level, failure, **kwargs)
