"""A real ``prefect server start`` on 127.0.0.1 with its own Prefect home, for the deployment
test and the benchmarks' worker runs (what workers on one work pool talk to)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def prefect_server(
    home: Path, timeout: float = 180, scheduler: bool = False, log: Path | None = None
) -> Iterator[dict[str, str]]:
    """Start a server with ``home`` as its ``PREFECT_HOME``; yields an environment (without
    any ``DROPVAULT_`` or other ``PREFECT_`` settings) whose ``PREFECT_API_URL`` points at it.

    ``scheduler`` runs its scheduler service (looking for new deployments every second);
    ``log`` keeps the server's output, warnings included, in that file."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DROPVAULT_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING" if log else "CRITICAL",
        PREFECT_LOGGING_LEVEL="WARNING",
        DO_NOT_TRACK="1",
    )
    args = ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    if scheduler:
        env["PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS"] = "1"
    else:
        args.append("--no-scheduler")
    out = log.open("wb") if log else None
    try:
        with serving([PREFECT, *args], f"http://127.0.0.1:{port}/api/health", timeout, env, out):
            yield env
    finally:
        if out:
            out.close()


@contextmanager
def serving(
    command: list[str],
    health_url: str,
    timeout: float,
    env: dict[str, str] | None = None,
    out: IO[bytes] | None = None,
) -> Iterator[None]:
    """Run ``command`` as a server until the block ends, once ``health_url`` answers
    without a server error; ``out`` takes its output (else it is discarded)."""
    proc = subprocess.Popen(  # noqa: S603 - this environment's own prefect or moto
        command,
        env=env,
        stdout=out or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(health_url, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command[:3])} did not start serving")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
