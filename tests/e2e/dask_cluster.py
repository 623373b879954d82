"""A real Dask cluster on 127.0.0.1 for tests: one scheduler, worker processes.

Every process is started in its own session, so stopping it by its PID's process
group also stops the worker a nanny spawned. Nothing listens beyond 127.0.0.1.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def dask_command() -> list[str]:
    """The `dask` command of this interpreter's environment."""
    return [str(Path(sys.executable).with_name("dask"))]


@dataclass
class DaskCluster:
    """A running scheduler and its workers, as the tests see them."""

    port: int
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    @property
    def runner(self) -> str:
        """The `--runner` value that sends work to this cluster."""
        return f"dask://{HOST}:{self.port}"

    def worker_pids(self) -> dict[str, int]:
        """Worker address to the PID of the process that runs its tasks."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return client.run(os.getpid)

    def executed_counts(self) -> dict[str, int]:
        """Worker address to how many tasks it has run since it started."""
        from distributed import Client

        def executed_count(dask_worker) -> int:
            return dask_worker.state.executed_count

        with Client(self.address, timeout=30) as client:
            return client.run(executed_count)

    def wait_for_workers(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Block until `count` workers are connected to the scheduler."""
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(count, timeout=timeout)

    def logs(self) -> str:
        """Everything the cluster's processes wrote, for failure messages."""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.log_dir.glob("*.log"))
        )


def _start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
        )


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop `process` and everything in its session: SIGTERM, then SIGKILL."""
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, stop_signal)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader is gone; a worker its nanny spawned may still be shutting down.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def running_cluster(
    log_dir: Path,
    workers: int = 2,
    threads: int = 2,
    env: dict[str, str] | None = None,
):
    """Start `dask scheduler` and `workers` `dask worker` processes; stop them all.

    Each worker runs one worker process (`--nworkers 1`) of `threads` threads,
    under a nanny that restarts it if it dies. Yields a `DaskCluster` once every
    worker is connected.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env if env is not None else os.environ)
    # Workers would otherwise spill to and lock files in the current folder.
    env.setdefault("DASK_TEMPORARY_DIRECTORY", str(log_dir))
    cluster = DaskCluster(port=free_port(), log_dir=log_dir)
    try:
        cluster.processes.append(
            _start(
                [
                    *dask_command(),
                    "scheduler",
                    "--host",
                    HOST,
                    "--port",
                    str(cluster.port),
                    # Its HTTP server (health, metrics) would take port 8787.
                    "--dashboard-address",
                    f"{HOST}:0",
                    "--no-dashboard",
                    "--no-jupyter",
                ],
                log_dir / "scheduler.log",
                env,
            )
        )
        for number in range(workers):
            cluster.processes.append(
                _start(
                    [
                        *dask_command(),
                        "worker",
                        cluster.address,
                        "--host",
                        HOST,
                        "--nworkers",
                        "1",
                        "--nthreads",
                        str(threads),
                        "--no-dashboard",
                        "--name",
                        f"worker-{number}",
                        "--local-directory",
                        str(log_dir / f"worker-{number}"),
                        "--death-timeout",
                        "60",
                    ],
                    log_dir / f"worker-{number}.log",
                    env,
                )
            )
        _wait_until_listening(cluster)
        cluster.wait_for_workers(workers)
        yield cluster
    finally:
        # Workers first, so they do not spend their shutdown reconnecting.
        for process in reversed(cluster.processes):
            stop_process_group(process)


def _wait_until_listening(cluster: DaskCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    scheduler = cluster.processes[0]
    while time.monotonic() < deadline:
        if scheduler.poll() is not None:
            raise RuntimeError(
                f"dask scheduler exited with {scheduler.returncode}:\n{cluster.logs()}"
            )
        try:
            with socket.create_connection((HOST, cluster.port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"dask scheduler not listening on {cluster.address} after "
        f"{START_TIMEOUT:.0f} s:\n{cluster.logs()}"
    )
