"""`segments import` and `segments export`: the data commands of the `segments` command line.
They are clients of a running server (gRPC, a project's secret key), so they live with the
client; the command line finds them through the `segments.commands` entry point."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from segments.client import (
    NotFoundError,
    SegmentsClient,
    SegmentsError,
    UnauthenticatedError,
    UnavailableError,
)
from segments.csv_export import export_csv
from segments.csv_import import (
    MAX_WORKERS,
    REPORT_COLUMNS,
    CsvImportError,
    ImportResult,
    Rejected,
    import_csv,
    write_rejects,
)

#: The server's gRPC port when GRPC_PORT is unset (the service's default too).
DEFAULT_GRPC_PORT = 50051
#: How long a command waits for the server to answer at all.
CONNECT_SECONDS = 5.0
#: Budget of one batch call: at a million contacts a batch of events takes about a second.
CALL_SECONDS = 120.0
#: Rejected rows listed on standard error; the rejects file has them all.
SHOWN_REJECTS = 20
#: Exit status of an import that rejected some rows and imported the others.
EXIT_REJECTED = 2


class CommandError(SystemExit):
    """A mistake of the command's user: one line on standard error, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"segments: {message}")


def add_commands(commands: Any) -> None:
    """Add `import` and `export` to the `segments` command line (argparse sub-parsers)."""
    imp = commands.add_parser(
        "import",
        help="import contacts or events from a CSV file into a running server",
        description=(
            "Contacts: an `email` column, optional `subscribed` (true/false), every other "
            "column into data. Events: `email,event`, optional `occurredAt`, every other "
            "column into the event's data. Sent 1,000 rows a call; rejected rows are listed "
            "with their line numbers and written to a rejects CSV, and the rest is imported. "
            "Data cells: true/false become booleans, plain decimal numbers (no leading zero, "
            "no +, no exponent) numbers, anything else text; empty cells are left out. "
            "Exit status 0: every row imported; 2: some rows rejected; 1: an error."
        ),
    )
    imp.add_argument(
        "file", metavar="FILE", type=Path, help="the CSV file (UTF-8, header on the first line)"
    )
    _connection(imp)
    imp.add_argument(
        "--strings", action="store_true", help="keep every data value as text, untyped"
    )
    imp.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="COLUMN",
        help="keep this column's values as text (zip codes, phone numbers); repeatable",
    )
    imp.add_argument(
        "--rejects",
        type=Path,
        default=None,
        help="where rejected rows go (default: FILE's name with .rejects.csv, beside it)",
    )
    imp.add_argument(
        "--from-line",
        type=int,
        default=2,
        metavar="N",
        help="skip the rows before line N, to resume an import that stopped",
    )
    imp.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=(
            f"calls in flight at once, 1 to {MAX_WORKERS} (default 1); the rows of one email "
            "keep their order. More is faster, but an import that stops may then have "
            "imported some rows past the line it resumes from (it names them)"
        ),
    )
    imp.add_argument("--encoding", default="utf-8-sig", help="the file's text encoding")
    imp.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    imp.set_defaults(handler=run_import)

    exp = commands.add_parser(
        "export",
        help="a segment's members as CSV on standard output, as GET /segments/{id}/export",
        description=(
            "Columns id,email,subscribed,createdAt,updatedAt,data (data as JSON), from one "
            "snapshot of the segment, streamed."
        ),
    )
    exp.add_argument("segment_id", metavar="SEGMENT_ID")
    _connection(exp)
    exp.add_argument(
        "-o", "--output", type=Path, default=None, help="write to this file, not standard output"
    )
    exp.set_defaults(handler=run_export)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help=f"the gRPC server, HOST:PORT (default 127.0.0.1:$GRPC_PORT, {DEFAULT_GRPC_PORT})",
    )
    parser.add_argument(
        "--key",
        default=None,
        help="the project's secret key (default $SEGMENTS_API_KEY); - reads it from standard input",
    )


def _target(args: argparse.Namespace) -> str:
    if args.target:
        return str(args.target)
    raw = os.environ.get("GRPC_PORT") or str(DEFAULT_GRPC_PORT)
    if not raw.isdigit():
        raise CommandError(f"GRPC_PORT must be a port number, got {raw!r}")
    return f"127.0.0.1:{raw}"


def _key(args: argparse.Namespace) -> str:
    key = args.key if args.key is not None else os.environ.get("SEGMENTS_API_KEY", "")
    if key == "-":
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise CommandError(
            "no API key: pass --key sk_… or set SEGMENTS_API_KEY "
            "(`segments keys create PROJECT --type secret` makes one)"
        )
    if key.startswith("pk_"):
        raise CommandError(
            f"`segments {args.command}` needs the project's secret key (sk_…); a public key "
            "(pk_…) only records single events (/v1/track)"
        )
    return key


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[SegmentsClient]:
    """A client of the server at --target with --key, once the server answers."""
    key = _key(args)
    target = _target(args)
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    )
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_SECONDS)
        except grpc.FutureTimeoutError:
            raise CommandError(
                f"no server answers at {target}: start it with `make run` (or `segments run`), "
                "or pass --target HOST:PORT"
            ) from None
        with SegmentsClient(target, key, channel=channel, timeout=CALL_SECONDS) as client:
            yield client
    finally:
        channel.close()


def _explain(err: SegmentsError, target: str) -> str:
    if isinstance(err, UnauthenticatedError):
        return (
            f"the server at {target} refused the key: {err.message} (keys belong to one "
            "installation's database; `segments keys list PROJECT` shows its keys)"
        )
    if isinstance(err, UnavailableError):
        return f"the server at {target} is unavailable: {err.message}"
    return str(err)


# --- export ---------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    target = _target(args)
    try:
        with _client(args) as client, _output(args.output) as out:
            export_csv(client, args.segment_id, out)
    except NotFoundError:
        raise CommandError(f"no segment {args.segment_id} in the key's project") from None
    except SegmentsError as err:
        raise CommandError(_explain(err, target)) from None
    except BrokenPipeError:
        # The reader went away (`| head`): what it read is what it wanted.
        _quiet_stdout()
    return 0


@contextmanager
def _output(path: Path | None) -> Iterator[io.TextIOWrapper]:
    if path is None:
        out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=False)
        try:
            yield out
            out.flush()
        finally:
            out.detach()
        return
    # A file is written whole or not at all: a failed export leaves nothing half-written.
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            yield out
        partial.replace(path)
    except OSError as err:
        raise CommandError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        partial.unlink(missing_ok=True)


def _quiet_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# --- import ---------------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise CommandError(f"no such file: {path}")
    if args.from_line < 2:
        raise CommandError("--from-line must be 2 or more (line 1 is the header)")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise CommandError(f"--workers must be 1 to {MAX_WORKERS}")
    rejects_path: Path = args.rejects or path.with_name(path.stem + ".rejects.csv")
    target = _target(args)
    with _client(args) as client:
        try:
            # Checks the key before the file is read: a wrong key fails here, not per batch.
            client.list_segments()
        except SegmentsError as err:
            raise CommandError(_explain(err, target)) from None
        stopped: CsvImportError | None = None
        with _progress(path, enabled=not args.no_progress and sys.stderr.isatty()) as progress:
            try:
                result = import_csv(
                    client,
                    path,
                    text_columns=None if args.strings else args.text,
                    from_line=args.from_line,
                    encoding=args.encoding,
                    workers=args.workers,
                    on_progress=progress,
                )
            except CsvImportError as err:
                stopped = err
    if stopped is not None:
        if stopped.result is None:
            raise CommandError(str(stopped))
        result = stopped.result
    written = _write_rejects(result, rejects_path, args.from_line)
    _report(result, path, written)
    if stopped is not None:
        done = f"{result.imported} rows imported"
        if stopped.resume_line is None:
            raise CommandError(f"{path}: {stopped} ({done})")
        again = f"segments import {path} --from-line {stopped.resume_line}"
        message = (
            f"{path}: {stopped}\n  {done} before line {stopped.resume_line}; "
            f"to go on from there: {again}"
        )
        if stopped.imported_after:
            lines = ", ".join(f"{a}-{b}" for a, b in stopped.imported_after)
            repeated = "recorded twice" if result.kind == "events" else "merged again"
            message += (
                f"\n  (other workers had imported rows between lines {lines} too: resumed "
                f"as it is, they are {repeated})"
            )
        raise CommandError(message)
    return EXIT_REJECTED if result.rejected else 0


@contextmanager
def _progress(path: Path, *, enabled: bool) -> Iterator[Any]:
    """A progress callback: a bar on standard error when it is a terminal, else nothing."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(path.name, total=path.stat().st_size, rows=0)

    def update(read: int, rows: int) -> None:
        bar.update(task, completed=read, rows=rows)

    with bar:
        yield update


def _write_rejects(result: ImportResult, path: Path, from_line: int) -> Path | None:
    """Write the rejected rows to `path`; a resumed import (`from_line`) keeps the rows the
    file already has from before that line. A previous rejects file is removed when no row
    was rejected; None then."""
    earlier: list[Rejected] = []
    ours = _is_rejects_file(path)
    if from_line > 2 and ours:
        earlier = _earlier_rejects(path, result, from_line)
    if not result.rejected and not earlier:
        if ours:
            path.unlink()
        return None
    result.rejected[:0] = earlier
    try:
        with path.open("w", encoding="utf-8", newline="") as out:
            write_rejects(result, out)
    except OSError as err:
        raise CommandError(f"cannot write the rejects file {path}: {err.strerror or err}") from None
    return path


def _is_rejects_file(path: Path) -> bool:
    """Whether `path` is a rejects file an import wrote (and may replace)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(header[-2:]) == REPORT_COLUMNS


def _earlier_rejects(path: Path, result: ImportResult, from_line: int) -> list[Rejected]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    # Back into the layout of the file being imported, whose report columns (if it is a
    # rejects file itself) write_rejects leaves out.
    keep = [i for i, name in enumerate(result.header) if name.strip() not in REPORT_COLUMNS]
    kept = []
    for row in rows:
        if len(row) < 2 or not row[-2].isdigit() or int(row[-2]) >= from_line:
            continue
        values = row[:-2]
        cells = [""] * len(result.header)
        for i, value in zip(keep, values, strict=False):
            cells[i] = value
        cells += values[len(keep) :]
        kept.append(Rejected(int(row[-2]), row[-1], tuple(cells)))
    return kept


def _report(result: ImportResult, path: Path, rejects: Path | None) -> None:
    """What was done: each rejected row on standard error, a JSON summary on standard out."""
    for row in result.rejected[:SHOWN_REJECTS]:
        print(f"{path}:{row.line}: rejected: {row.reason}", file=sys.stderr)
    if len(result.rejected) > SHOWN_REJECTS:
        print(
            f"… and {len(result.rejected) - SHOWN_REJECTS} more rejected rows in {rejects}",
            file=sys.stderr,
        )
    for column, kinds in result.mixed_columns().items():
        counts = ", ".join(f"{n:,} {kind}" for kind, n in sorted(kinds.items()))
        print(
            f"note: column {column!r} holds values of several types ({counts}); filters "
            f"compare types exactly: import it again with --text {column} to keep it all text",
            file=sys.stderr,
        )
    summary: dict[str, Any] = {"file": str(path), "kind": result.kind, "rows": result.rows}
    summary["imported"] = result.imported
    if result.kind == "contacts":
        summary["created"] = result.created
        summary["updated"] = result.updated
    summary["rejected"] = len(result.rejected)
    summary["rejectsFile"] = str(rejects) if rejects is not None else None
    summary["seconds"] = round(result.seconds, 2)
    summary["rowsPerSecond"] = round(result.rows / result.seconds) if result.seconds else None
    print(json.dumps(summary), flush=True)
