"""The home's kept Prefect server (``dropvault server start``): later commands on the home run
against it, it stops when told, and a record it left when it died misleads no one."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dropvault.flows import home_server
from dropvault.storage.locations import Location
from dropvault.tasks import samples
from tests.helpers import EXE, cli_env


def dv(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("PREFECT_")}
    env.update(DROPVAULT_QUIET_SECONDS="0", PREFECT_LOGGING_LEVEL="WARNING", DO_NOT_TRACK="1")
    proc = subprocess.run(  # noqa: S603 - this environment's own dropvault
        [EXE, *args], env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, f"dropvault {args} failed: {proc.stderr[-2000:]}"
    return proc


def flow_runs(url: str) -> list[dict[str, object]]:
    request = urllib.request.Request(  # noqa: S310 - the test's own loopback server
        f"{url}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
        return list(json.loads(reply.read()))


def running_process(pid: int, wait: float = 10.0) -> bool:
    """Whether ``pid`` still runs after ``wait`` seconds (a zombie waiting for init to reap it
    has an empty command line)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if not cmdline.read_bytes():
                return False
        except FileNotFoundError:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.integration
def test_commands_run_against_the_kept_server_until_it_is_stopped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    dv(home, "init")
    url = dv(home, "server", "start").stdout.split("home server: ")[1].strip()
    assert url.startswith("http://127.0.0.1:")
    record = json.loads((home / "prefect" / home_server.RECORD).read_text())
    assert record["url"] == url
    try:
        assert dv(home, "server", "start").stdout.strip() == f"home server: {url}"  # found
        rng = random.Random(5)
        _, files = samples.make_study(rng, samples.make_patient(rng, 5), 3, "CT_small.dcm")
        samples.write_drop(Location(f"file://{home / 'drops'}"), "fac", "d1", files)
        assert "ingested: 3" in dv(home, "ingest").stdout
        runs = flow_runs(url)
        assert [r["state_type"] for r in runs] == ["COMPLETED"]  # recorded on the kept server
        assert "nothing to ingest" in dv(home, "ingest").stdout  # still no flow run for that
        assert len(flow_runs(url)) == 1
    finally:
        stopped = dv(home, "server", "stop").stdout
    assert "stopped" in stopped
    assert not (home / "prefect" / home_server.RECORD).exists()
    assert not running_process(int(record["pid"]))
    assert dv(home, "server", "status").stdout.strip() == "no home server running"


def test_a_record_of_a_dead_server_is_ignored_and_removed(tmp_path: Path) -> None:
    (tmp_path / "prefect").mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    gone.wait()
    record = tmp_path / "prefect" / home_server.RECORD
    record.write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": gone.pid}))
    assert home_server.running(tmp_path) is None
    assert not record.exists()


@pytest.mark.parametrize("content", ["not json", "[]", '{"url": 1, "pid": "x"}'])
def test_a_damaged_record_is_no_server(tmp_path: Path, content: str) -> None:
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / home_server.RECORD).write_text(content)
    assert home_server.running(tmp_path) is None
    assert home_server.stop(tmp_path) is False


def test_stop_never_signals_a_process_that_took_the_recorded_number(tmp_path: Path) -> None:
    """After a reboot the recorded pid may belong to anything: only a Prefect server is
    stopped, and a stranger on the recorded port is not taken for the server."""
    stranger = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        (tmp_path / "prefect").mkdir()
        record = {"url": "http://127.0.0.1:9/api", "pid": stranger.pid}
        (tmp_path / "prefect" / home_server.RECORD).write_text(json.dumps(record))
        assert home_server.running(tmp_path) is None
        (tmp_path / "prefect" / home_server.RECORD).write_text(json.dumps(record))
        assert home_server.stop(tmp_path) is True
        time.sleep(0.2)
        assert stranger.poll() is None
        os.kill(stranger.pid, 0)
    finally:
        stranger.kill()
        stranger.wait()


def home_processes(home: Path) -> list[int]:
    """Processes (of this user) whose Prefect home is ``home``'s: a server left behind."""
    marker = f"\0PREFECT_HOME={home.resolve() / 'prefect'}\0".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in b"\0" + environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue  # gone, or another user's
    return [pid for pid in found if pid != os.getpid() and running_process(pid, wait=0.0)]


def home_with_drop(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    dv(home, "init")
    rng = random.Random(7)
    _, files = samples.make_study(rng, samples.make_patient(rng, 7), 3, "CT_small.dcm")
    samples.write_drop(Location(f"file://{home / 'drops'}"), "fac", "d1", files)
    return home


def no_temporary_server(home: Path) -> dict[str, str]:
    """The command's environment with Prefect's own temporary server forbidden: a flow that
    ran anyway ran on the command's server."""
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("PREFECT_")}
    env.update(DROPVAULT_QUIET_SECONDS="0", DO_NOT_TRACK="1")
    env.update(PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_EPHEMERAL_ENABLED="false")
    return env


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_command_runs_its_flow_on_its_own_server_and_leaves_none(tmp_path: Path) -> None:
    home = home_with_drop(tmp_path)
    env = no_temporary_server(home)
    ingest = subprocess.run(  # noqa: S603 - this environment's own dropvault
        [EXE, "ingest"], env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert "ingested: 3" in ingest.stdout
    assert home_processes(home) == []  # its server stopped with it
    # No catalog-write slot in the home's Prefect database: the server that would have
    # leased it dies with the command, so a command killed holding it would lock every
    # later run out (DuckDB's file lock guards these runs instead).
    with contextlib.closing(sqlite3.connect(home / "prefect" / "prefect.db")) as db:
        slots = db.execute(
            "SELECT count(*) FROM concurrency_limit_v2 WHERE name = 'dropvault-catalog-write'"
        ).fetchone()
    assert slots == (0,)
    status = subprocess.run(  # noqa: S603
        [EXE, "status", "--json"], env=env, capture_output=True, text=True, timeout=400
    )
    assert status.returncode == 0, status.stderr[-2000:]
    flows = {r["flow"]: r for r in json.loads(status.stdout) if r["section"] == "flows"}
    assert flows["ingest-drops"]["last_state"] == "COMPLETED"  # recorded in the home's Prefect
    assert home_processes(home) == []


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_killed_command_takes_its_server_with_it(tmp_path: Path) -> None:
    home = home_with_drop(tmp_path)
    command = subprocess.Popen(  # noqa: S603 - this environment's own dropvault
        [EXE, "ingest"], env=no_temporary_server(home), stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        servers = []
        while not servers and time.monotonic() < deadline:
            servers = [pid for pid in home_processes(home) if pid != command.pid]
            time.sleep(0.05)
        assert servers, "the command started no server of its own"
    finally:
        command.kill()  # SIGKILL: no exit handler of the command runs
        command.wait()
    assert not any(running_process(pid) for pid in servers)


@pytest.mark.integration
def test_a_server_that_cannot_start_is_one_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    home = home_with_drop(tmp_path)
    (home / "prefect").mkdir(exist_ok=True)
    (home / "prefect" / "prefect.db").write_bytes(b"not a database " * 100)
    started = time.monotonic()
    ingest = subprocess.run(  # noqa: S603 - this environment's own dropvault
        [EXE, "ingest"], env=no_temporary_server(home), capture_output=True, text=True, timeout=400
    )
    assert ingest.returncode == 1
    error = ingest.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Prefect's server for this command stopped"), error
    assert str(home / "prefect" / home_server.LOG) in error
    assert "Application startup failed" in (home / "prefect" / home_server.LOG).read_text()
    assert time.monotonic() - started < 120  # told at once, not after the 180 s start timeout
    assert len(list((home / "drops" / "fac" / "d1").rglob("*.dcm"))) == 3  # every file kept


def test_a_wrong_start_timeout_fails_before_any_server_starts(tmp_path: Path) -> None:
    home = home_with_drop(tmp_path)
    env = no_temporary_server(home) | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "soon"}
    ingest = subprocess.run(  # noqa: S603 - this environment's own dropvault
        [EXE, "ingest"], env=env, capture_output=True, text=True, timeout=400
    )
    assert ingest.returncode == 1
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 'soon'" in ingest.stderr
    assert not (home / "prefect" / home_server.LOG).exists()  # nothing was started


def listening_port(pid: int) -> int | None:
    """The TCP port ``pid`` listens on, from /proc (the command keeps its server's URL)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if m := re.fullmatch(r"socket:\[(\d+)\]", str(fd.readlink())):
                inodes.add(m[1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            return int(fields[1].split(":")[1], 16)
    return None


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc")
def test_a_request_held_open_does_not_keep_the_server_of_a_killed_command(tmp_path: Path) -> None:
    """Anyone on the machine can hold a request open on the unauthenticated API; a graceful
    shutdown would wait for it for ever once the command is gone."""
    home = home_with_drop(tmp_path)
    command = subprocess.Popen(  # noqa: S603 - this environment's own dropvault
        [EXE, "ingest"], env=no_temporary_server(home), stdout=subprocess.DEVNULL
    )
    held = None
    try:
        deadline = time.monotonic() + 120
        while held is None and command.poll() is None and time.monotonic() < deadline:
            servers = [pid for pid in home_processes(home) if pid != command.pid]
            port = listening_port(servers[0]) if servers else None
            if port and home_server._healthy(f"http://127.0.0.1:{port}/api", 1.0):
                held = socket.create_connection(("127.0.0.1", port))
                held.sendall(
                    b"POST /api/flow_runs/filter HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
                )
            time.sleep(0.05)
        assert held is not None, "the command's server never answered"
        time.sleep(0.5)
    finally:
        command.send_signal(signal.SIGKILL)
        command.wait()
    try:
        assert not any(running_process(pid) for pid in servers)
    finally:
        held.close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    got: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.got.append(f"{self.command} {self.path}")
        self.send_response(200)  # a stand-in that says yes to everything
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.integration
def test_a_proxy_of_the_users_does_not_stand_in_for_the_homes_server(tmp_path: Path) -> None:
    home = home_with_drop(tmp_path)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    env = no_temporary_server(home) | {"http_proxy": url, "HTTP_PROXY": url}
    try:
        ingest = subprocess.run(  # noqa: S603 - this environment's own dropvault
            [EXE, "ingest"], env=env, capture_output=True, text=True, timeout=400
        )
    finally:
        proxy.shutdown()
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert "ingested: 3" in ingest.stdout
    assert _Recorder.got == []


def test_a_mistyped_home_starts_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "hoem"
    env = no_temporary_server(typo)
    commands = [["reconcile"], ["shares"], ["ingest"], ["status"], ["sweep"]]
    commands.append(["beacons", "--compile"])
    for command in commands:
        proc = subprocess.run(  # noqa: S603 - this environment's own dropvault
            [EXE, *command], env=env, capture_output=True, text=True, timeout=400
        )
        assert proc.returncode == 1, command
        assert "DROPVAULT_HOME" in proc.stderr, proc.stderr
    assert not typo.exists()
