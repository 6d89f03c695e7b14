"""A home's own Prefect server, kept running between commands (``dropvault server start``).

With no ``PREFECT_API_URL``, each command that runs a flow starts Prefect's temporary
server and stops it on exit: 5-10 s on a 2-core machine, paid again by every command
(importing Prefect's server modules alone takes ~5 s, then its database migrations and
services start). That start is Prefect's, not ours, and no setting removes it.

``dropvault server start`` starts one ``prefect server start`` for the home instead: on
127.0.0.1 and a free port, with the home's Prefect database (``<home>/prefect``), detached
from the terminal, its output in ``<home>/prefect/server.log``. It records its address in
``<home>/prefect/server.json``; every later command on that home (with no
``PREFECT_API_URL`` of its own) finds it by a health check of at most half a second and runs
against it, as a deployed worker does. ``dropvault server stop`` stops it. A record whose
server died (a reboot, a kill) is removed by the next command, which then starts the
command's own server (below) as before. Nothing starts a kept server on its own:
``dropvault demo`` and a plain command leave no process behind.

With neither ``PREFECT_API_URL`` nor a kept server, a command that runs a flow starts a
:class:`CommandServer`: the same server Prefect's temporary one runs (uvicorn on
``prefect.server.api.server:create_app``, ephemeral, no UI, the home's database), but
started by the command before it imports its flow, so the server's ~5 s of imports overlap
the command's own, and the flow runs as a plain client of it, as a worker's does (Prefect's
own temporary server is started from inside the flow's process, which then also loads the
server's modules: ~64 MB more resident memory). It listens on a socket the command bound
(127.0.0.1, a free port: no race for the port with another program) and dies with the
command: at exit, on Ctrl-C (same process group), and on a kill of the command (the
parent-death signal, on Linux).

The server listens on loopback only and, as any ``prefect server start``, without
authentication: other users of the same machine can reach its API (run records, no images,
keys or patient data: flows publish PHI-free summaries only).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RECORD = "server.json"
LOG = "server.log"


def _prefect_home(home: Path) -> Path:
    return home.resolve() / "prefect"


# Straight to the home's own loopback server: a proxy of the user's must not answer for it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str, timeout: float) -> bool:
    try:
        # Our own loopback address (http://127.0.0.1:<port>/api), never a user's URL.
        with _DIRECT.open(f"{url}/health", timeout=timeout) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` is still a Prefect server: a number reused by another process after
    a reboot is not (read from /proc where there is one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process holds the number now
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        args = cmdline.read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc here: trust the number
    except OSError:
        return False
    return b"prefect" in args and b"server" in args


def _read(home: Path) -> dict[str, object] | None:
    try:
        record = json.loads((_prefect_home(home) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("url"), str)
    return record if ok and isinstance(record.get("pid"), int) else None


def running(home: Path, timeout: float = 0.5) -> str | None:
    """The API URL of the home's kept server, or None. A record whose server is gone is
    removed."""
    record = _read(home)
    if record is None:
        return None
    url, pid = str(record["url"]), int(str(record["pid"]))
    if _alive(pid) and _healthy(url, timeout):
        return url
    if not _alive(pid):
        with contextlib.suppress(OSError):
            (_prefect_home(home) / RECORD).unlink()
    return None


# Run in the command server's process before uvicorn: ask the kernel to SIGKILL it when its
# parent (the command) dies however it dies (not SIGTERM: uvicorn would wait for every open
# request, and anyone on the machine can hold one open); exit at once if that happened.
_SERVER_CHILD = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass  # not Linux: the command still stops it at exit
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
sys.argv = ["uvicorn", *sys.argv[2:]]
from uvicorn.main import main
main()
"""


class CommandServer:
    """Prefect's server for one command (see the module's docstring). Start it before
    Prefect is imported in this process, point the process at :attr:`url` (set
    ``PREFECT_API_URL``), and call :meth:`wait` before the first flow.

    Start it from the main thread: the parent-death signal fires when the thread that
    started it ends."""

    def __init__(self, home: Path, environment: dict[str, str]) -> None:
        prefect_home = _prefect_home(home)
        prefect_home.mkdir(parents=True, exist_ok=True)
        self.log = prefect_home / LOG
        env = {k: v for k, v in environment.items() if k != "PREFECT_API_URL"}
        env.setdefault("PREFECT_HOME", str(prefect_home))
        # What Prefect's SubprocessASGIServer sets for its temporary server.
        env.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1")
        env.update(PREFECT__SERVER_FINAL="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        with socket.socket() as sock, self.log.open("ab") as log:
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
            args = ["--fd", str(sock.fileno()), "--factory", "prefect.server.api.server:create_app"]
            self.process = subprocess.Popen(  # noqa: S603 - this environment's own uvicorn
                [sys.executable, "-c", _SERVER_CHILD, str(os.getpid()), *args]
                + ["--log-level", "error", "--lifespan", "on", "--timeout-graceful-shutdown", "5"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(sock.fileno(),),
            )
        self._ready = False
        atexit.register(self.stop)  # before Prefect's own exit handlers: runs after them

    def wait(self, timeout: float) -> str:
        """Block until the server answers its health check; returns :attr:`url`."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Prefect's server for this command stopped (exit {self.process.returncode})"
                    f" before it answered; see {self.log}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Prefect's server for this command did not answer within {timeout:.0f} s"
                    f" (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {self.log}"
                )
            self._ready = _healthy(self.url, 1.0)
            if not self._ready:
                time.sleep(0.05)
        return self.url

    def stop(self, wait: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(home: Path, environment: dict[str, str], timeout: float = 180.0) -> str:
    """Start the home's server unless one runs; returns its API URL. ``environment``: the
    server's, without ``PREFECT_API_URL`` (:func:`dropvault.flows.settings.server_environment`)."""
    url = running(home)
    if url is not None:
        return url
    prefect_home = _prefect_home(home)
    prefect_home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in environment.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    prefect = str(Path(sys.executable).with_name("prefect"))
    args = ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with (prefect_home / LOG).open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - this environment's own prefect
            [prefect, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal's Ctrl-C
        )
    deadline = time.monotonic() + timeout
    while not _healthy(url, 2.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc.pid)
            raise RuntimeError(f"the home's Prefect server did not start; see {prefect_home / LOG}")
        time.sleep(0.25)
    record = {"url": url, "pid": proc.pid, "started_at": time.time()}
    (prefect_home / RECORD).write_text(json.dumps(record), encoding="utf-8")
    return url


def _terminate(pid: int, wait: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # the server and the workers it started
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def stop(home: Path) -> bool:
    """Stop the home's server; False when none was recorded."""
    record = _read(home)
    if record is None:
        return False
    pid = int(str(record["pid"]))
    if _alive(pid):
        _terminate(pid)
    with contextlib.suppress(OSError):
        (_prefect_home(home) / RECORD).unlink()
    return True
