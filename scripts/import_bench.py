"""Measure `segments import` against a running server (`make run`): a contacts file, then an
events file over those contacts, imported through the public gRPC API; prints rows/s and the
peak RSS of the import process and of the server replica.

    make run                                   # in another terminal
    .venv/bin/python scripts/import_bench.py --contacts 100000 --events 1000000 [--workers 2]

It creates a project of its own (`segments create-project`, so the same database as the
server: same installation, same data directory or DATABASE_URL) and writes the files into a
temporary directory (--keep to keep them)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SEGMENTS = Path(sys.executable).parent / "segments"
PLANS = ("free", "pro", "team", "enterprise")
COUNTRIES = ("DE", "FR", "US", "GB", "NL", "ES", "IT", "SE")
EVENTS = ("page_view", "purchase", "signup", "email.opened", "email.clicked", "login")


def write_contacts(path: Path, n: int, rng: random.Random) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "subscribed", "plan", "seats", "country", "signupDate", "vip"])
        for i in range(n):
            out.writerow(
                [
                    f"user{i}@example.com",
                    "true" if rng.random() < 0.9 else "false",
                    rng.choice(PLANS),
                    rng.randint(1, 50),
                    rng.choice(COUNTRIES),
                    f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                    "true" if rng.random() < 0.05 else "false",
                ]
            )


def write_events(path: Path, n: int, contacts: int, rng: random.Random) -> None:
    start = time.time() - 365 * 86400
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "event", "occurredAt", "amount", "page"])
        for _ in range(n):
            moment = time.gmtime(start + rng.random() * 365 * 86400)
            event = rng.choice(EVENTS)
            out.writerow(
                [
                    f"user{rng.randrange(contacts)}@example.com",
                    event,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", moment),
                    f"{rng.randint(1, 50000) / 100:.2f}" if event == "purchase" else "",
                    f"/p/{rng.randrange(200)}" if event == "page_view" else "",
                ]
            )


def server_process(port: int) -> psutil.Process | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return psutil.Process(conn.pid) if conn.pid else None
    return None


class PeakRss(threading.Thread):
    """Samples a process's RSS every 0.2 s; `peak` is the largest seen."""

    def __init__(self, process: psutil.Process | None) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while self.process is not None and not self.done.wait(0.2):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return


def run_import(
    path: Path, key: str, target: str, workers: int, server: psutil.Process | None
) -> dict[str, float]:
    started = time.monotonic()
    child = subprocess.Popen(
        [
            str(SEGMENTS),
            "import",
            str(path),
            "--target",
            target,
            "--workers",
            str(workers),
            "--no-progress",
        ],
        env={**os.environ, "SEGMENTS_API_KEY": key},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watches = [PeakRss(psutil.Process(child.pid)), PeakRss(server)]
    for watch in watches:
        watch.start()
    stdout, stderr = child.communicate()
    seconds = time.monotonic() - started
    for watch in watches:
        watch.done.set()
    if child.returncode != 0:
        raise SystemExit(f"import of {path} failed ({child.returncode}):\n{stderr}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "rows": summary["imported"],
        "seconds": seconds,
        "rowsPerSecond": summary["imported"] / seconds,
        "importPeakRssMiB": watches[0].peak / 2**20,
        "serverPeakRssMiB": watches[1].peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--target", default=f"127.0.0.1:{os.environ.get('GRPC_PORT', '50051')}")
    parser.add_argument("--workers", type=int, default=1, help="segments import --workers")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    made = subprocess.run(
        [str(SEGMENTS), "create-project", "--name", f"import bench {time.strftime('%H:%M:%S')}"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = json.loads(made.stdout)["secretKey"]
    server = server_process(int(args.target.rsplit(":", 1)[1]))
    workdir = Path(tempfile.mkdtemp(prefix="segments-import-bench-"))
    try:
        rng = random.Random(42)
        contacts, events = workdir / "contacts.csv", workdir / "events.csv"
        write_contacts(contacts, args.contacts, rng)
        write_events(events, args.events, args.contacts, rng)
        for path in (contacts, events):
            size = path.stat().st_size / 2**20
            result = run_import(path, key, args.target, args.workers, server)
            print(
                f"{path.name}: {result['rows']:,.0f} rows ({size:.0f} MiB) in "
                f"{result['seconds']:.1f} s = {result['rowsPerSecond']:,.0f} rows/s; peak RSS: "
                f"import {result['importPeakRssMiB']:.0f} MiB, "
                f"server {result['serverPeakRssMiB']:.0f} MiB",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
