"""Peak memory of one large file ingested embedded, from local disk and from S3 (moto).

    python benchmarks/ingest_large_s3.py            # one file of ~52 MB and one of ~315 MB
    python benchmarks/ingest_large_s3.py --quick    # ~5 MB and ~10 MB, what CI runs
    python benchmarks/ingest_large_s3.py --server   # the flow as a client of a Prefect server
    python benchmarks/ingest_large_s3.py --server --python /srv/venv/bin/python
                                      # the flow in a production install (no dev extra)

Embedded, the flow's process also hosts Prefect's temporary API server (SQLAlchemy,
FastAPI): ~60 MB of its RSS. ``--server`` starts a real ``prefect server start`` and
runs the flow as its client, as a worker's flow-run process does in production.
``--python`` runs the ingest in another environment: the dev extra (Jupyter, moto) pulls
in packages that Prefect then imports (jsonschema's format checkers), ~45 MB more.

Each ingest runs in a fresh child process started by a small parent (Linux keeps the
largest RSS across fork and exec, so a parent that wrote the file would inflate it), and
moto runs in a process of its own. The goal: memory bounded whatever the file's size, on
S3 as on local disk; the figures show the S3 client's fixed share beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/prefect_server.py
from tests.prefect_server import prefect_server  # noqa: E402

SETUP = """
import random, sys
import s3fs
from dropvault.tasks import samples
path, frames, endpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "wb") as fh:
    samples.write_multiframe(fh, samples.make_patient(random.Random(1), 1), "1.2.3.4.5",
                             "1.2.3.4.5.6", frames)
if endpoint:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")
    fs.put(path, sys.argv[4])
"""
CHILD = """
import json, resource
from dropvault.flows.settings import Settings, quiet_prefect_defaults
quiet_prefect_defaults()
from dropvault.flows.ingest import ingest_drops
settings = Settings.load()
stats = ingest_drops(home=settings.build_home(), settings=settings)
print(json.dumps({"ingested": stats.ingested,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    root: Path,
    frames: int,
    endpoint: str | None,
    server: dict[str, str] | None = None,
    python: str = sys.executable,
) -> tuple[float, float]:
    """``(file MB, peak RSS MB)`` of one ingest of one file (embedded, or as a client of
    ``server``'s Prefect API)."""
    root.mkdir()
    env = {
        **(server or os.environ),
        "DROPVAULT_HOME": str(root / "home"),
        "DROPVAULT_QUIET_SECONDS": "0",
    }
    if not server:
        env["PREFECT_HOME"] = str(root / "prefect")
    prefix = f"bench-large/{root.name}"
    if endpoint:
        env |= {f"DROPVAULT_{n.upper()}_URL": f"s3://{prefix}/{n}" for n in
                ("drops", "vault", "quarantine", "archive")}  # fmt: skip
        env |= {
            "DROPVAULT_S3_ENDPOINT_URL": endpoint,
            "DROPVAULT_S3_KEY": "bench",
            "DROPVAULT_S3_SECRET": "bench",  # moto's throwaway credentials
        }
    subprocess.run([sys.executable, "-m", "dropvault.flows.cli", "init"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    local = root / "home" / "drops" / "fac" / "d1" / "big.dcm"
    local.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", SETUP, str(local), str(frames), endpoint or "",
                    f"{prefix}/drops/fac/d1/big.dcm"], env=env, check=True)  # fmt: skip
    size = local.stat().st_size / 1e6
    if endpoint:
        local.unlink()
    out = subprocess.run([python, "-c", CHILD], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["ingested"] != 1:
        raise RuntimeError(f"ingested {result['ingested']} of 1")
    return size, float(result["peak_rss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small files (CI)")
    parser.add_argument("--server", action="store_true", help="as a Prefect server's client")
    parser.add_argument("--python", default=sys.executable, help="the ingest's interpreter")
    args = parser.parse_args()
    sizes = (10, 20) if args.quick else (100, 600)  # 512x512x16 frames: ~0.5 MB each
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        for _ in range(150):
            try:
                client = boto3.client(
                    "s3", endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id="bench", aws_secret_access_key="bench",  # noqa: S106
                )  # fmt: skip
                client.create_bucket(Bucket="bench-large")
                break
            except Exception:  # noqa: BLE001 - moto still starting
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
            server = None
            if args.server:
                server = stack.enter_context(prefect_server(Path(tmp) / "prefect-server"))
            print(f"store   file MB   peak RSS MB   ({'server' if server else 'embedded'})")
            for store in ("local", "s3"):
                for frames in sizes:
                    root = Path(tmp) / f"{store}-{frames}"
                    s3 = endpoint if store == "s3" else None
                    size, rss = run(root, frames, s3, server, args.python)
                    print(f"{store:<7} {size:>7.0f}   {rss:>11.0f}")
    finally:
        moto.kill()
    print("goal: peak RSS the same for both sizes (bounded), on S3 as on local disk")


if __name__ == "__main__":
    main()
