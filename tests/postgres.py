"""A throwaway PostgreSQL server on 127.0.0.1, for DuckLake's metadata in tests and
benchmarks. It uses Debian's ``postgresql`` package (``.ci/run`` installs it) and a
temporary data folder; as root it runs the server as the ``postgres`` user, because
PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (see .ci/run)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    root: Path
    port: int
    bindir: Path
    user: str = "dropvault"
    database: str = "lake"

    @property
    def conninfo(self) -> str:
        return f"dbname={self.database} host=127.0.0.1 port={self.port} user={self.user}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)  # noqa: S603

    def psql(self, sql: str, database: str | None = None) -> str:
        out = subprocess.run(  # noqa: S603
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
             "-d", database or self.database, "-v", "ON_ERROR_STOP=1", "-Atc", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.stdout

    def dump(self, schema: str | None = None) -> bytes:
        """``pg_dump`` of the database (or one schema), as a user's backup would hold it."""
        only = ["-n", schema] if schema else []
        out = subprocess.run(  # noqa: S603
            [str(self.bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             self.user, *only, self.database],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return out.stdout

    def heap_files(self) -> list[tuple[str, bytes]]:
        """Every table and index file of the cluster after a CHECKPOINT (dirty pages
        written out), without the WAL: what a copy of the data folder would hold."""
        self.psql("CHECKPOINT")
        names = dict(
            line.split("|", 1)
            for line in self.psql(
                "SELECT pg_relation_filenode(oid), relname FROM pg_class"
                " WHERE pg_relation_filenode(oid) IS NOT NULL"
            ).splitlines()
            if "|" in line
        )
        data = self.root / "data"
        return [
            (f"postgres {p.relative_to(data)} ({names.get(p.name.split('_')[0], '?')})",
             p.read_bytes())
            for folder in ("base", "global")
            for p in (data / folder).rglob("*")
            if p.is_file()
        ]  # fmt: skip

    @classmethod
    @contextlib.contextmanager
    def start(cls) -> Iterator[PostgresServer]:
        bindir = _bindir()
        root = Path(tempfile.mkdtemp(prefix="dropvault-pg-"))
        root.chmod(0o755)  # noqa: S103 - the postgres user must reach its data folder
        server = cls(root=root, port=_free_port(), bindir=bindir)
        data = root / "data"
        data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        server._run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", server.user)
        server._run(
            str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(data / "log"),
            "-o", f"-p {server.port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    server.psql(f"CREATE DATABASE {server.database}", database="postgres")
                    break
                except subprocess.CalledProcessError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            yield server
        finally:
            server._run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop",
                        check=False)  # fmt: skip
            shutil.rmtree(root, ignore_errors=True)
