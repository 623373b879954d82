"""The local Prefect server that commands share when no API URL is configured.

With no API URL configured, Prefect starts a temporary server when a flow first
runs: it imports its whole server package into the calling process only to launch
it (about 2 s of CPU on a two-core machine), then waits while a child process
imports that package again and starts (about 3 s). Every command paid that again.

The command line instead starts a child at once, before it imports Prefect. The
child reads Prefect's settings and decides, on the other core while the command
imports Prefect:

- An API URL is configured (in the environment or the active profile), or
  temporary servers are switched off: it exits, and Prefect behaves as it always
  does.
- A server that an earlier command started for the same settings is still up:
  it reports that server's address and exits. The command then runs at once.
- Otherwise it serves Prefect's own application (`create_app(ephemeral=True)`,
  the one Prefect's temporary server serves) on a socket the command bound on
  127.0.0.1, and reports its own address.

A server a command started outlives it by `DIRIMAGE_SERVER_IDLE_TIMEOUT` seconds
(600 unless set): it stops once no command has used it, or holds it, for that
long. Every command that uses the server holds a shared lock on a lease file in
the Prefect home for as long as it runs (the kernel drops it when the command
ends, however it ends), and the server stops only while it can take that lock
for itself, so it never stops under a running command. Its record (address,
process, and the password it was started with) lives beside the lease, readable
only by its owner; the server refuses requests without the password, so other
local users cannot use it while it waits.

When the Prefect home that the environment names already records a live shared
server, the command does not start the child at all: once it has imported
Prefect's settings, it checks the record against them itself, and starts the
child only if the server does not suit them. A shared server writes what it has
to say, when it began to wait and when it stopped among it, to a log beside its
record, begun anew by each server.

With `DIRIMAGE_SERVER_IDLE_TIMEOUT=0` every command has a server of its own that
stops with the command, even after SIGKILL: the child watches a pipe whose other
end only the command holds.

If the child reports nothing, the command falls back to Prefect's own temporary
server, so nothing here can make a run fail that would otherwise succeed.

This module must not import Prefect at the top: `launch` runs before the import.
"""

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

SERVER_MODULE = "flows.temporary_server"
IDLE_TIMEOUT_VARIABLE = "DIRIMAGE_SERVER_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT = 600.0
MAX_IDLE_TIMEOUT = 7 * 24 * 3600.0
RECORD_NAME = "dirimage-server.json"
REGISTRY_LOCK_NAME = "dirimage-server.lock"
LEASE_NAME = "dirimage-server.lease"
LOG_NAME = "dirimage-server.log"

# A server that ignores SIGTERM this long is killed: the command is over, and
# only a record of its runs is at stake.
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
IDLE_CHECK_INTERVAL = 1.0
# A shared server still starting can take seconds to answer its first request.
REUSE_HEALTH_TIMEOUT = 30.0


def idle_timeout() -> float:
    """Seconds a server a command started outlives it, from the environment.

    Raises ValueError, naming the variable, for anything but a number of seconds
    from 0 to a week.
    """
    text = os.environ.get(IDLE_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_IDLE_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= MAX_IDLE_TIMEOUT:
        raise ValueError(
            f"{IDLE_TIMEOUT_VARIABLE} must be a number of seconds from 0 to "
            f"{MAX_IDLE_TIMEOUT:.0f}, found {text!r}"
        )
    return seconds


class TemporaryServer:
    """The child that finds or serves the Prefect API for this command.

    Create it with `launch`; call `wait_until_ready` once Prefect is imported.
    After that, `api_url` and `auth_string` say how to reach the server.
    Without a process, the child is not started yet: a shared server seemed to
    be running, and `wait_until_ready` looks for it in this process first.
    """

    def __init__(
        self,
        process: subprocess.Popen | None,
        report_pipe: int = -1,
        parent_pipe: int = -1,
        verbose: bool = False,
    ):
        self.process = process
        self._verbose = verbose
        self.api_url: str | None = None
        self.auth_string: str | None = None
        self.shared = False
        self._report_pipe = report_pipe
        self._parent_pipe = parent_pipe
        self._lease: int | None = None
        self._report: dict | None = None
        atexit.register(self.stop)

    def wait_until_ready(self, timeout: float, settings=None) -> str | None:
        """The API URL once the server answers, or None if it never will.

        None when the child reports nothing (it exits without a report when
        Prefect has an API URL configured or is not allowed a temporary server,
        and when it fails), or when `timeout` seconds pass. `settings`, Prefect's
        current ones, let this process find a shared server without the child.
        """
        deadline = time.monotonic() + timeout
        if self.process is None and settings is not None:
            if self._use_recorded_server(settings):
                return self.api_url
        for _ in range(2):
            report = self._report_of_a_child(deadline)
            if report is None or not report.get("lease") or self._hold_lease(report):
                break
            # The shared server stopped, idle, between being reported and this
            # command taking its lease; a second child starts a new one.
            log.debug("the server at %s stopped before its lease", report["url"])
            self._let_the_child_go()
            report = None
        if report is None:
            self.stop()
            return None

        url = report["url"]
        while time.monotonic() < deadline:
            if _healthy(url, timeout=2):
                self.api_url = url
                self.auth_string = report.get("auth")
                self.shared = bool(report.get("lease"))
                return url
            if report.get("own") and self.process.poll() is not None:
                break
            time.sleep(POLL_INTERVAL)
        log.debug("server at %s not ready after %.0f s", url, timeout)
        self.stop()
        return None

    def _report_of_a_child(self, deadline: float) -> dict | None:
        """Start the child unless it runs, and read its report; None if none."""
        if self.process is None:
            started = _start_child(self._verbose)
            if started is None:
                return None
            self.process, self._report_pipe, self._parent_pipe = started
        report = self._read_report(deadline)
        if report is None:
            log.debug("no server reported; child status %s", self.process.poll())
        return report

    def _let_the_child_go(self) -> None:
        """Forget the child: it has exited after its report, or serves a server
        that, shared, stops by itself once idle."""
        os.close(self._parent_pipe)
        self._parent_pipe = -1
        self.process, self._report = None, None

    def _read_report(self, deadline: float) -> dict | None:
        """The child's one-line report, or None at its end of file or the deadline."""
        if self._report is not None or self._report_pipe < 0:
            return self._report
        data = b""
        try:
            while not data.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                readable, _, _ = select.select([self._report_pipe], [], [], remaining)
                if not readable:
                    return None
                chunk = os.read(self._report_pipe, 4096)
                if not chunk:
                    return None
                data += chunk
            self._report = json.loads(data)
        except (OSError, ValueError) as error:
            log.debug("unreadable report from the server child: %s", error)
            return None
        finally:
            os.close(self._report_pipe)
            self._report_pipe = -1
        return self._report

    def _use_recorded_server(self, settings) -> bool:
        """Find and lease the shared server for `settings`, as the child would."""
        if not _wants_local_server(settings) or not _shareable(settings):
            return False
        home = Path(settings.home)
        try:
            with _registry_lock(home):
                shared = _find_shared_server(home, _fingerprint(settings))
        except OSError as error:
            log.debug("cannot read the shared server's record: %s", error)
            return False
        if shared is None:
            return False
        report = _report_of_shared(shared, home)
        if not self._hold_lease(report):
            return False
        self._report = report
        self.api_url, self.auth_string = report["url"], report["auth"]
        self.shared = True
        return True

    def _hold_lease(self, report: dict) -> bool:
        """Take a shared lock on the lease; whether the reported server still runs.

        A server stops only after taking the lease for itself and removing its
        record, so once this command holds the lease, a record that still names
        the server means it stays up until the command ends.
        """
        home = Path(report["home"])
        try:
            lease = _open_lease(home)
        except OSError as error:
            log.debug("cannot open the lease: %s", error)
            return False
        fcntl.flock(lease, fcntl.LOCK_SH)
        record = _read_record(home)
        if not record or record.get("pid") != report["pid"]:
            os.close(lease)
            return False
        self._lease = lease
        return True

    def stop(self) -> None:
        """Let the server go; safe to call more than once.

        A server started for this command alone (with an idle timeout of 0, or
        a database that cannot be shared) stops now: closing the pipe asks it to
        shut down as SIGTERM would, and it is killed if it has not finished
        within `STOP_TIMEOUT` seconds. A shared server, this command's own
        included, only loses this command's lease, and stops by itself once
        idle.
        """
        if self._parent_pipe >= 0:
            os.close(self._parent_pipe)
            self._parent_pipe = -1
        if self._lease is not None:
            os.close(self._lease)
            self._lease = None
        report = self._read_report(time.monotonic() + STOP_TIMEOUT)
        if self.process is None or (report is not None and report.get("lease")):
            return
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch(verbose: bool = False) -> TemporaryServer | None:
    """Start the child that finds or serves a server, unless it seems unneeded.

    Returns None when PREFECT_API_URL is set in the environment. When the Prefect
    home that the environment names records a running shared server, the child
    waits: `wait_until_ready` checks that server with Prefect's settings first,
    which spares this command a second import of Prefect on the other core.
    Otherwise the child starts, and checks the rest of Prefect's settings itself.
    The child's output reaches this command's stderr only when `verbose`, and
    only while the command runs; a shared server's goes to its log in the
    Prefect home.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    if _shared_server_recorded():
        return TemporaryServer(None, verbose=verbose)
    started = _start_child(verbose)
    if started is None:
        return None
    return TemporaryServer(*started, verbose=verbose)


# The child imports this very module: with `-m` or a bare `-c`, Python would look
# in the current folder first, where a project of the user's may have a `flows`
# package of its own.
_CHILD_CODE = (
    f"import sys; sys.path[0] = {str(Path(__file__).resolve().parents[1])!r}; "
    f"from {SERVER_MODULE} import main; sys.exit(main(sys.argv[2:]))"
)


def _shared_server_recorded() -> bool:
    """Whether the environment's Prefect home names a live shared server.

    A guess made before Prefect is imported: Prefect may take its home from
    elsewhere, and the server may not suit this command's settings.
    """
    try:
        if not idle_timeout():
            return False
    except ValueError:
        return False
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    return _live_server_pid(_read_record(home)) is not None


def _start_child(verbose: bool) -> tuple[subprocess.Popen, int, int] | None:
    """The child, the pipe it reports on, and the pipe it watches; None if it
    could not be started."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        watched, parent_pipe = os.pipe()
        report_pipe, report_end = os.pipe()
        output = None if verbose else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, SERVER_MODULE]
                + [str(listener.fileno()), str(watched), str(report_end)],
                pass_fds=(listener.fileno(), watched, report_end),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # Ctrl-C reaches this command, which then stops the server
                # after its own clean-up, rather than both at once.
                start_new_session=True,
            )
        except OSError:
            os.close(parent_pipe)
            os.close(report_pipe)
            raise
        finally:
            os.close(watched)
            os.close(report_end)
    except OSError as error:
        log.debug("could not start a temporary server: %s", error)
        return None
    finally:
        listener.close()
    return process, report_pipe, parent_pipe


class ServerInUse(Exception):
    """The shared server cannot be stopped: a running command holds its lease."""


def stop_shared_server(home: Path) -> int | None:
    """Stop the shared server of Prefect home `home`; its process id, or None.

    None when no server is recorded there. Raises ServerInUse, and stops
    nothing, while a command holds the lease. The lease stays taken until the
    server has gone, so no command starts using it meanwhile.
    """
    with _registry_lock(home):
        pid = _live_server_pid(_read_record(home))
        if pid is None:
            return None
        lease = _lease_for_no_one_else(home)
        if lease is None:
            raise ServerInUse(
                f"the local Prefect server (pid {pid}) is in use by a running "
                "command; it stops by itself once idle"
            ) from None
        os.unlink(home / RECORD_NAME)
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _is_our_server(pid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if _is_our_server(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(lease)
    return pid


def _open_lease(home: Path) -> int:
    return os.open(home / LEASE_NAME, os.O_RDWR | os.O_CREAT, 0o600)


def _lease_for_no_one_else(home: Path) -> int | None:
    """The lease, locked for this process alone; None while a command holds it."""
    lease = _open_lease(home)
    try:
        fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lease)
        return None
    return lease


def _healthy(api_url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def _read_record(home: Path) -> dict | None:
    try:
        with open(home / RECORD_NAME, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(home: Path, record: dict) -> None:
    """Write the record whole or not at all, readable only by its owner."""
    staged = home / f".{RECORD_NAME}.{os.getpid()}"
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "w", encoding="utf-8") as file:
        json.dump(record, file)
    os.replace(staged, home / RECORD_NAME)


def _remove_record_if_mine(home: Path) -> None:
    record = _read_record(home)
    if record and record.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(home / RECORD_NAME)


@contextlib.contextmanager
def _registry_lock(home: Path):
    """Held while a record is read and trusted, written, or removed."""
    descriptor = os.open(home / REGISTRY_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _live_server_pid(record: dict | None) -> int | None:
    """The process a record names, if it is still a server of this module."""
    pid = record.get("pid") if record else None
    return pid if isinstance(pid, int) and _is_our_server(pid) else None


def _is_our_server(pid: int) -> bool:
    """Whether `pid` is a live server process of this module (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            arguments = file.read().split(b"\0")
    except OSError:
        return False
    return SERVER_MODULE.encode() in arguments


def _fingerprint(settings) -> str:
    """What a shared server must have in common with a command that uses it."""
    import prefect

    server_settings = settings.server.model_dump(
        mode="json", context={"include_secrets": True}
    )
    # Each server has a password of its own; the rest must match.
    server_settings["api"].pop("auth_string", None)
    this_module = Path(__file__).resolve()
    identity = {
        "python": [os.path.realpath(sys.executable), sys.prefix],
        "prefect": prefect.__version__,
        "module": [str(this_module), this_module.stat().st_mtime_ns],
        "home": str(settings.home),
        "server": server_settings,
    }
    encoded = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def _wants_local_server(settings) -> bool:
    """Whether Prefect, with these settings, would start a temporary server."""
    return not settings.api.url and settings.server.ephemeral.enabled


def _report_of_shared(record: dict, home: Path) -> dict:
    """What a command needs to know of a shared server found by its record."""
    found = {key: record.get(key) for key in ("url", "auth", "pid")}
    return {**found, "home": str(home), "lease": True}


def _shareable(settings) -> bool:
    """Whether another command, in another folder, would reach the same database."""
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    # sqlite:///name is relative to the folder the server was started in.
    return not (url.startswith("sqlite") and not re.match(r"sqlite[^:]*:////", url))


def _find_shared_server(home: Path, fingerprint: str) -> dict | None:
    """A running shared server for these settings; call with the registry lock."""
    record = _read_record(home)
    if not record or record.get("fingerprint") != fingerprint:
        return None
    if _live_server_pid(record) is None:
        return None
    # The request also counts as use, so the server does not decide it is idle
    # before the command that found it takes its lease.
    if not _healthy(record.get("url", ""), timeout=REUSE_HEALTH_TIMEOUT):
        return None
    return record


class _ActivityTracker:
    """ASGI middleware: how many requests and websockets are open, and since when
    the server has been idle."""

    def __init__(self, app):
        self.app = app
        self.open = 0
        self.last_seen = time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.open += 1
        self.last_seen = time.monotonic()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last_seen = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.open else time.monotonic() - self.last_seen


def _report(report_fd: int, report: dict) -> None:
    with open(report_fd, "w", encoding="utf-8") as pipe:
        pipe.write(json.dumps(report) + "\n")


def _serve(listener_fd: int, watched_fd: int, report_fd: int) -> int:
    """The child: find a shared server, or serve Prefect's API on the socket."""
    listener = socket.socket(fileno=listener_fd)
    linger = idle_timeout()
    # Set before Prefect reads its settings: the server checks the password on
    # every request, websockets included, from these.
    os.environ.setdefault("PREFECT_SERVER_API_AUTH_STRING", secrets.token_urlsafe())

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not _wants_local_server(settings):
        return 0
    home = Path(settings.home)
    port = listener.getsockname()[1]
    auth = settings.server.api.auth_string.get_secret_value()
    own = {"url": f"http://127.0.0.1:{port}/api", "auth": auth, "own": True}
    if not linger or not _shareable(settings):
        _report(report_fd, own)
        _run_server(listener, watched_fd, home, linger=0)
        _exit_at_once()

    home.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(settings)
    with _registry_lock(home):
        shared = _find_shared_server(home, fingerprint)
        if shared is None:
            record = {**own, "pid": os.getpid(), "fingerprint": fingerprint}
            _write_record(home, record)
    if shared is not None:
        listener.close()
        _report(report_fd, _report_of_shared(shared, home))
        return 0
    _report(report_fd, {**own, "pid": os.getpid(), "home": str(home), "lease": True})
    try:
        _run_server(listener, watched_fd, home, linger=linger)
    finally:
        with _registry_lock(home):
            _remove_record_if_mine(home)
    _note("stopped")
    _exit_at_once()


def _run_server(listener, watched_fd: int, home: Path, linger: float) -> None:
    """Serve Prefect's API on `listener` until told to stop, or until idle."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = _ActivityTracker(create_app(ephemeral=True, final=True))
    config = uvicorn.Config(app, log_level="error", lifespan="on")
    server = uvicorn.Server(config)

    def stop_when_idle() -> None:
        # Reads return only at end of file: when the command closes its end or dies.
        while os.read(watched_fd, 1):
            pass
        if not linger:
            server.should_exit = True
            return
        _leave_the_command(home)
        _note(f"waits for commands; stops once unused for {linger:.0f} s")
        while not server.should_exit:
            time.sleep(IDLE_CHECK_INTERVAL)
            if app.idle_for() >= linger and _retire(home, app, linger):
                server.should_exit = True

    if linger and _is_devnull(2):
        _log_to_file(home)
    # uvicorn shuts down on SIGTERM and SIGINT, then raises the signal again
    # under the handlers it found; those must let the caller's clean-up run.
    for stopping in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stopping, lambda number, frame: None)
    threading.Thread(target=stop_when_idle, daemon=True).start()
    server.run(sockets=[listener])


def _exit_at_once() -> None:
    """End the child once its server has shut down cleanly.

    The database is closed by then. What is left, Prefect's exit handlers and the
    teardown of its modules, took over a second and would write nothing that
    matters.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _leave_the_command(home: Path) -> None:
    """Let go of what ties a lingering server to the command that started it.

    Its output (the command's pipes, when verbose) goes to its log in the
    Prefect home, so that whoever reads the pipes sees their end; its folder
    becomes the Prefect home, so that the command's folder can be unmounted.
    """
    _log_to_file(home)
    with contextlib.suppress(OSError):
        os.chdir(home)


@functools.cache
def _log_file(home: Path) -> int:
    """The server's log, begun anew by each server; /dev/null if it cannot be."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    try:
        return os.open(home / LOG_NAME, flags, 0o600)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY)


def _log_to_file(home: Path) -> None:
    """Send this process's output to its log."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(_log_file(home), 1)
    os.dup2(_log_file(home), 2)


def _is_devnull(descriptor: int) -> bool:
    info, null = os.fstat(descriptor), os.stat(os.devnull)
    return (info.st_dev, info.st_ino) == (null.st_dev, null.st_ino)


def _note(event: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    print(
        f"{stamp} dirimage local Prefect server, pid {os.getpid()}: {event}",
        file=sys.stderr,
        flush=True,
    )


def _retire(home: Path, app: _ActivityTracker, linger: float) -> bool:
    """Remove the record if the server is still idle and no command holds a lease.

    With the record gone, new commands start a server of their own; one that read
    the record just before finds it gone once it holds the lease, and does too.
    """
    with _registry_lock(home):
        if app.idle_for() < linger:
            return False
        if _lease_for_no_one_else(home) is None:
            return False
        # The lease stays locked until this process exits: a command that opens
        # it now waits, then finds no record.
        _remove_record_if_mine(home)
        return True


def main(arguments: list[str]) -> int:
    """The child's entry: the listening socket, the watched pipe and the report
    pipe, as inherited file descriptors."""
    listener_fd, watched_fd, report_fd = map(int, arguments)
    return _serve(listener_fd, watched_fd, report_fd)
