"""TorchServe's own reading of a form request in the worker against ts_handlers.worker_protocol.

    python benchmarks/worker_protocol.py [--fields 740000] [--skip-torchserve]

Builds the message TorchServe's frontend sends a worker for one urlencoded body of empty fields
(``x&x&...``: one parameter per field, framed as ``ModelRequestEncoder`` writes it), writes it
into a socket pair from a thread, and reads it in this process with TorchServe's
``_retrieve_request`` and with ours, each in a fresh child process so that their peak memory
is their own. Prints seconds, microseconds per field, peak RSS growth (sampled every 10 ms),
the parameters kept, and the ratio, with the CPU it ran on (docs/security.md, "Form and
multipart bodies").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time


def field(value: bytes) -> bytes:
    return struct.pack("!i", len(value)) + value


def form_message(fields: int) -> bytes:
    """One request of ``fields`` empty urlencoded fields, then the end of the batch."""
    parameter = field(b"x") + field(b"text/plain") + field(b"")
    return b"".join(
        [
            field(b"request-0"),
            field(b"Content-Type") + field(b"application/x-www-form-urlencoded"),
            struct.pack("!i", -1),
            parameter * fields,
            struct.pack("!i", -1) * 2,
        ]
    )


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def read_once(reader_name: str, fields: int) -> dict:
    from ts_handlers import worker_protocol

    reader = (
        worker_protocol._torchserve_retrieve_request()
        if reader_name == "torchserve"
        else worker_protocol.retrieve_request
    )
    worker_protocol._otf()  # TorchServe's module imports torch: not part of the reading
    message = form_message(fields)
    writer, conn = socket.socketpair()
    threading.Thread(target=writer.sendall, args=(message,), daemon=True).start()
    before = rss_kib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    batch = []
    while (request := reader(conn)) is not None:
        batch.append(request)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    grown = max(peak[0], rss_kib()) - before
    return {
        "reader": reader_name,
        "message_bytes": len(message),
        "seconds": seconds,
        "us_per_field": seconds / fields * 1e6,
        "rss_mb": grown / 1024,
        "kept": len(batch[0]["parameters"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=740_000)
    parser.add_argument("--skip-torchserve", action="store_true", help="only ours")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_once(args.child, args.fields)))
        return
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; {args.fields:,} empty urlencoded fields"
    )
    rows = {}
    readers = ["ts_handlers"] if args.skip_torchserve else ["torchserve", "ts_handlers"]
    for name in readers:
        command = [sys.executable, __file__, "--fields", str(args.fields), "--child", name]
        rows[name] = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
        row = rows[name]
        print(
            f"{name:12} {row['message_bytes']:,} bytes of message: {row['seconds']:.2f} s, "
            f"{row['us_per_field']:.2f} us a field, peak RSS +{row['rss_mb']:.0f} MB, "
            f"{row['kept']:,} parameters kept"
        )
    if len(rows) == 2:
        ratio = rows["torchserve"]["seconds"] / rows["ts_handlers"]["seconds"]
        print(f"ts_handlers reads it {ratio:.1f}x as fast as TorchServe's own reader")


if __name__ == "__main__":
    main()
