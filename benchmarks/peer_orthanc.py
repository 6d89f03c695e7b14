"""Orthanc, the open DICOM server a user would otherwise pick, side by side with dropvault.

    sudo apt-get install orthanc          # once, outside CI and the README's two commands
    python benchmarks/peer_orthanc.py     # 2,000 files
    python benchmarks/peer_orthanc.py -n 10000

Orthanc runs on 127.0.0.1 with a temporary configuration: its own HTTP and DICOM ports,
storage and index in a temporary folder, remote access off. The same small files go
through its REST API (``POST /instances``) from 2 concurrent keep-alive clients. The
plain copy and dropvault's ingest of the same files are measured in the same run:
one ingest flow (one process, as the demo runs it), and ``--workers`` (default 2)
worker processes on one Prefect server, each ingesting its shard. Orthanc's server
uses every core with its 2 clients, and so do 2 dropvault workers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ingest import ingest_with_workers, make_files, plain_copy, write_tree  # noqa: E402

from dropvault.flows.settings import Settings, quiet_prefect_defaults  # noqa: E402

quiet_prefect_defaults()

from dropvault.flows.ingest import ingest_drops  # noqa: E402
from dropvault.storage.home import Home  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_orthanc(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("Orthanc")
    if exe is None:
        sys.exit("Orthanc is not installed: sudo apt-get install orthanc")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "dropvault-peer",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": False,
        "Plugins": [],
        "HttpThreadsCount": 4,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(  # noqa: S603 - our own temporary configuration
        [exe, str(root / "orthanc.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/system")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("Orthanc did not start")


def post_all(port: int, paths: list[Path], clients: int = 2) -> float:
    """POST every file to /instances from ``clients`` keep-alive connections."""
    errors: list[str] = []

    def worker(chunk: list[Path]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for path in chunk:
            conn.request(
                "POST",
                "/instances",
                body=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"{path.name}: HTTP {response.status}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(paths[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"Orthanc refused {len(errors)} files, e.g. {errors[0]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="number of files")
    parser.add_argument("--workers", type=int, default=2, help="dropvault worker processes")
    args = parser.parse_args()
    files = make_files(args.n, 50)
    with tempfile.TemporaryDirectory(prefix="dv-peer-") as tmp:
        root = Path(tmp)
        write_tree(root / "source", files)
        paths = sorted((root / "source").rglob("*.dcm"))
        copy_s = min(plain_copy(root / "source", root / f"copy{i}") for i in range(3))
        proc, port = start_orthanc(root / "orthanc")
        try:
            orthanc_s = post_all(port, paths)
        finally:
            proc.terminate()
            proc.wait(30)
        ingest_drops(home=Home.init(root / "warm"), settings=Settings.load(quiet_seconds=0))
        shutil.copytree(root / "source", root / "home" / "drops")
        started = time.perf_counter()
        stats = ingest_drops(
            home=Home.init(root / "home"),
            settings=Settings.load(quiet_seconds=0, home=root / "home"),
        )
        ingest_s = time.perf_counter() - started
        assert stats.ingested == args.n, stats.as_dict()
        shutil.copytree(root / "source", root / "multi" / "drops")
        multi_s, ingested = ingest_with_workers(root / "multi", args.workers)
        assert ingested == args.n, ingested
    n = args.n
    print(f"files: {n}  cores: {os.cpu_count()}  Orthanc: 2 keep-alive clients, POST /instances")
    print(f"{'run':<20}{'files/s':>10}{'x copy':>9}")
    for name, secs in (("plain fsspec copy", copy_s), ("Orthanc", orthanc_s)):
        print(f"{name:<20}{n / secs:>10.0f}{copy_s / secs:>9.3f}")
    multi = f"dropvault x{args.workers}"
    print(f"{'dropvault x1':<20}{n / ingest_s:>10.0f}{copy_s / ingest_s:>9.3f}")
    print(f"{multi:<20}{n / multi_s:>10.0f}{copy_s / multi_s:>9.3f}")
    print(f"dropvault x1 / Orthanc: {orthanc_s / ingest_s:.2f}x")
    print(f"{multi} / Orthanc: {orthanc_s / multi_s:.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
