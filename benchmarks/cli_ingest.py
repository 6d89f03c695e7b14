"""``dropvault ingest`` as a user runs it: the whole command, start to exit, by where its flow
reports.

    python benchmarks/cli_ingest.py              # 5,000 CT files of 39 kB
    python benchmarks/cli_ingest.py --quick      # 100 files, what CI runs

Three ways, each on a new home (after one untimed ingest of 10 other files) with the same
files, timed as wall-clock seconds of the command (Python's start, imports, the flow, the
exit):

- embedded: no ``PREFECT_API_URL``: the command starts Prefect's server for itself before it
  imports the flow (``CommandServer``: the start overlaps the command's imports);
- kept home server: after ``dropvault server start`` (its start is not timed: it is paid once);
- a Prefect server: ``PREFECT_API_URL`` naming a running ``prefect server start``, as a
  deployed worker has.

The goal (#23): embedded within 1.25x of the server's time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ingest import make_files, write_tree  # noqa: E402
from tests.prefect_server import prefect_server  # noqa: E402

EXE = str(Path(sys.executable).with_name("dropvault"))


def env_for(home: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DROPVAULT_", "PREFECT_"))}
    env.update(DROPVAULT_HOME=str(home), DROPVAULT_QUIET_SECONDS="0", DO_NOT_TRACK="1")
    if api:
        env["PREFECT_API_URL"] = api
    return env


def dv(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(  # noqa: S603 - this environment's own dropvault
        [EXE, *args], env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"dropvault {' '.join(args)} failed: {proc.stderr[-1500:]}")
    return proc.stdout


def timed_ingest(root: Path, files: list[tuple[str, bytes]], mode: str, api: str | None) -> float:
    """The second ``ingest`` on a new home: the first (10 other files, not timed) migrates
    the home's Prefect database, which a user pays once."""
    home = root / mode.replace(" ", "-")
    env = env_for(home, api)
    dv(env, "init")
    if mode == "kept home server":
        dv(env, "server", "start")
    try:
        warm = [("warm" + name[3:], data) for name, data in make_files(10, 10, seed=99)]
        write_tree(home / "drops", warm)  # facilities warm-0..2, not the timed fac-0..2
        dv(env, "ingest")
        write_tree(home / "drops", files)
        started = time.perf_counter()
        out = dv(env, "ingest")
        seconds = time.perf_counter() - started
    finally:
        if mode == "kept home server":
            dv(env, "server", "stop")
    if f"ingested: {len(files)}" not in out:
        raise SystemExit(f"{mode}: not every file was ingested:\n{out[-800:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 100 if args.quick else args.n
    files = make_files(n, 50)
    print(f"files: {n}  cores: {os.cpu_count()}  (wall seconds of the whole command)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with prefect_server(root / "server-home") as server_env:
            seconds = {
                "a Prefect server": timed_ingest(
                    root, files, "a Prefect server", server_env["PREFECT_API_URL"]
                )
            }
        for mode in ("embedded", "kept home server"):
            seconds[mode] = timed_ingest(root, files, mode, None)
    base = seconds["a Prefect server"]
    print(f"{'run':<22}{'seconds':>9}{'files/s':>9}{'x server time':>15}")
    for mode in ("a Prefect server", "embedded", "kept home server"):
        s = seconds[mode]
        print(f"{mode:<22}{s:>9.2f}{n / s:>9.0f}{s / base:>15.2f}")
    print("goal: embedded <= 1.25x the server's time")


if __name__ == "__main__":
    main()
