"""moto's S3 server on 127.0.0.1 in a process of its own, for the tests and the benchmarks.

A process rather than moto's ``ThreadedMotoServer``: the server's threads then neither take
the test process's GIL nor share its fate (a crash inside werkzeug once took a whole test
worker down with it)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.prefect_server import free_port


@contextmanager
def moto_server(timeout: float = 60) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(  # noqa: S603 - this environment's own moto
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto's server did not start")
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
