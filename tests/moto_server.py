"""moto's S3 server on 127.0.0.1 in a process of its own, for the tests and the benchmarks.

A process rather than moto's ``ThreadedMotoServer``: the server's threads then neither take
the test process's GIL nor share its fate (a crash inside werkzeug once took a whole test
worker down with it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tests.prefect_server import free_port, serving


@contextmanager
def moto_server(timeout: float = 60) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, f"{endpoint}/moto-api/", timeout):
        yield endpoint
