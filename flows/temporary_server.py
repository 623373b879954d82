"""A temporary Prefect server for one command, started before Prefect is imported.

With no API URL configured, Prefect starts a temporary server when a flow first
runs: it imports its whole server package into the calling process only to launch
it (about 2 s of CPU on a two-core machine), then waits while a child process
imports that package again and starts (about 3 s). The command line instead
starts the same child at once, so the server starts on the other core while the
command imports Prefect, and the calling process never imports the server.

The child serves Prefect's own application (`create_app(ephemeral=True)`, the one
Prefect's temporary server serves) on a socket the parent bound on 127.0.0.1. It
decides for itself, from Prefect's settings, whether it is needed: when an API URL
is configured (in the environment or the active profile) or temporary servers are
switched off, it exits at once, and Prefect behaves as it always does. It also
exits when the parent dies, even by SIGKILL: it watches a pipe whose other end
only the parent holds.

If the child does not come up, the command falls back to Prefect's own temporary
server, so nothing here can make a run fail that would otherwise succeed.

This module must not import Prefect at the top: `launch` runs before the import.
"""

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

log = logging.getLogger(__name__)

# A temporary server that ignores SIGTERM this long is killed: the command is
# over, and only a record of its runs is at stake.
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


class TemporaryServer:
    """The child process serving the Prefect API for this command.

    Create it with `launch`; call `wait_until_ready` once Prefect is imported.
    """

    def __init__(self, process: subprocess.Popen, port: int, parent_pipe: int):
        self.process = process
        self.port = port
        self.api_url = f"http://127.0.0.1:{port}/api"
        self._parent_pipe = parent_pipe
        atexit.register(self.stop)

    def wait_until_ready(self, timeout: float) -> str | None:
        """The API URL once the server answers, or None if it never will.

        None when the child exits first (it does so when Prefect has an API URL
        configured or is not allowed a temporary server, and when it fails), or
        when `timeout` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log.debug("temporary server exited with %s", self.process.returncode)
                return None
            if self._healthy():
                return self.api_url
            time.sleep(POLL_INTERVAL)
        log.debug("temporary server not ready after %.0f s", timeout)
        self.stop()
        return None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and wait for it; safe to call more than once.

        Closing the pipe asks the child to shut down as SIGTERM would; it is
        killed if it has not finished within `STOP_TIMEOUT` seconds.
        """
        if self._parent_pipe >= 0:
            os.close(self._parent_pipe)
            self._parent_pipe = -1
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch(verbose: bool = False) -> TemporaryServer | None:
    """Start a temporary server in a child process, unless one is clearly unneeded.

    Returns None when PREFECT_API_URL is set in the environment. Otherwise the
    child starts, and checks the rest of Prefect's settings itself. Its output is
    discarded unless `verbose`.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        watched, parent_pipe = os.pipe()
        output = None if verbose else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__]
                + [str(listener.fileno()), str(watched)],
                pass_fds=(listener.fileno(), watched),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # Ctrl-C reaches this command, which then stops the server
                # after its own clean-up, rather than both at once.
                start_new_session=True,
            )
        except OSError:
            os.close(parent_pipe)
            raise
        finally:
            os.close(watched)
    except OSError as error:
        log.debug("could not start a temporary server: %s", error)
        return None
    finally:
        listener.close()
    return TemporaryServer(process, port, parent_pipe)


def _needed() -> bool:
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def _serve(listener_fd: int, watched_fd: int) -> int:
    """The child: serve Prefect's API on the inherited socket until told to stop."""
    listener = socket.socket(fileno=listener_fd)
    if not _needed():
        return 0

    import uvicorn
    from prefect.server.api.server import create_app

    config = uvicorn.Config(
        create_app(ephemeral=True, final=True), log_level="error", lifespan="on"
    )
    server = uvicorn.Server(config)

    def stop_when_parent_goes() -> None:
        # Reads return only at end of file: when the parent closes its end or dies.
        while os.read(watched_fd, 1):
            pass
        server.should_exit = True

    threading.Thread(target=stop_when_parent_goes, daemon=True).start()
    server.run(sockets=[listener])
    # The server has shut down cleanly; the database is closed. What is left,
    # Prefect's exit handlers and the teardown of its modules, took over a
    # second and would write nothing that matters.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), int(sys.argv[2])))
