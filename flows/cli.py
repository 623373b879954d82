"""The `dirimage` command line.

Exit status: 0 on success, 1 when the work failed (with a one-line error on
stderr), 2 for usage errors and for `inspect` of a folder that is not an image.
Prefect is imported only by the commands that run flows.
"""

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path

import storage
from flows import parameters, runners, temporary_server

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MIB = 1024 * 1024


def _prepare_prefect(verbose: bool) -> None:
    """Set Prefect defaults for a command-line run; the user's settings win.

    Must run before Prefect is imported: it reads its settings at import.
    """
    if not verbose:
        # Prefect's per-task lines would bury the progress bar, and its failure
        # tracebacks would bury the one-line error this command prints itself;
        # they still reach the server when one is configured.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # With no PREFECT_API_URL, Prefect starts a temporary server and gives up
    # after 20 s; on a busy two-core machine its start alone took longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Only a temporary server started by this process reads this. Its telemetry
    # job wrote to the SQLite database while the flow did, and lost the race with
    # a "database is locked" traceback.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextlib.contextmanager
def _flow_settings(verbose: bool):
    """Prefect settings for the flows one command runs.

    With no API URL configured, the command serves its runs from a local server
    that it finds or starts before importing Prefect (see `flows.temporary_server`);
    if none comes up, Prefect starts its own temporary server as usual.

    Flow run heartbeats are switched off unless the user set their frequency
    (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, in the environment or the profile). Each
    flow run waits up to a second at its end for the heartbeat thread, which
    sleeps in one-second steps, to stop: most of what a small copy costs. A
    command's run lasts as long as the command, and a server acts on missed
    heartbeats only through an automation the user adds; who has one sets the
    frequency and keeps them. On a local server they are always off: nothing
    there would ever act on them.
    """
    _prepare_prefect(verbose)
    server = temporary_server.launch(verbose)
    from prefect.settings import get_current_settings, temporary_settings

    settings = get_current_settings()
    updates: dict[str, object] = {"flows.heartbeat_frequency": None}
    if settings.api.url:
        if server is not None:
            server.stop()
        if "heartbeat_frequency" in settings.flows.model_fields_set:
            updates = {}
        with temporary_settings(updates=updates):
            yield
        return

    url = None
    if server is not None:
        timeout = settings.server.ephemeral.startup_timeout_seconds
        url = server.wait_until_ready(timeout, settings)
    if url is not None:
        # The environment too, for good: Prefect's background threads and the
        # processes a flow starts (a local Dask cluster's workers) read their
        # settings from it, and its exit handlers still send events after this.
        updates["api.url"] = url
        os.environ["PREFECT_API_URL"] = url
        if server.auth_string:
            updates["api.auth_string"] = server.auth_string
            os.environ["PREFECT_API_AUTH_STRING"] = server.auth_string
    with temporary_settings(updates=updates):
        yield


class ProgressBar:
    """A one-line progress bar with bytes and speed, for terminals."""

    WIDTH = 30

    def __init__(self, stream, label: str):
        self.stream = stream
        self.label = label
        self.drawn = False

    def __call__(self, progress) -> None:
        total = max(progress.total_bytes, 1)
        fraction = min(progress.done_bytes / total, 1.0)
        if not progress.total_bytes and progress.total_items:
            fraction = progress.done_items / progress.total_items
        filled = int(fraction * self.WIDTH)
        speed = progress.done_bytes / MIB / max(progress.seconds, 1e-6)
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
            f"{fraction * 100:5.1f}% {progress.done_bytes / MIB:8.1f}/"
            f"{progress.total_bytes / MIB:.1f} MiB {speed:7.1f} MiB/s "
            f"{progress.done_items}/{progress.total_items} blobs"
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _with_progress_bar(label: str, run):
    """Call `run()` with a progress bar on stderr when stderr is a terminal."""
    if not sys.stderr.isatty():
        return run()
    from flows.progress import add_listener, remove_listener

    bar = ProgressBar(sys.stderr, label)
    add_listener(bar)
    try:
        return run()
    finally:
        remove_listener(bar)
        bar.close()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, found {value}")
    return value


def _bounded(convert, bounds: parameters.Bounds):
    """An argparse type: `convert(text)`, refused outside the flows' `bounds`."""

    def check(text: str):
        value = convert(text)
        if not bounds.low <= value <= bounds.high:
            raise argparse.ArgumentTypeError(
                f"must be from {bounds.low} to {bounds.high}, found {text}"
            )
        return value

    # argparse names the type in its message for text that does not convert.
    check.__name__ = convert.__name__
    return check


_parallel = _bounded(int, parameters.PARALLEL)
_retries = _bounded(int, parameters.RETRIES)
_seconds = _bounded(float, parameters.SECONDS)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, found {value}")
    return value


def _runner(text: str) -> str:
    try:
        return runners.check_runner(text)
    except (ValueError, ImportError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


RUNNER_HELP = (
    "where the blob tasks run: thread (default), dask (a temporary local cluster) "
    "or dask://HOST:PORT (a running Dask scheduler)"
)


def _platform(text: str) -> str:
    try:
        storage.Platform.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def run_inspect(args) -> int:
    try:
        description = storage.describe_image(_strip_dir(args.image))
    except (storage.ImageError, OSError) as error:
        # A folder that cannot be read as an image is the caller's to fix, like
        # one that holds none: status 2, one line even for a path with a newline.
        print(f"dirimage: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(description, indent=2))
    return EXIT_OK


def run_stop_server(args) -> int:
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    try:
        pid = temporary_server.stop_shared_server(home)
    except temporary_server.ServerInUse as error:
        print(f"dirimage: {error}", file=sys.stderr)
        return EXIT_FAILED
    if pid is None:
        print(f"no local Prefect server is running for {home}")
    else:
        print(f"stopped the local Prefect server (pid {pid}) of {home}")
    return EXIT_OK


def _strip_dir(location: str) -> str:
    return location[len("dir:") :] if location.startswith("dir:") else location


def run_copy(args) -> int:
    _prepare_prefect(args.verbose)
    from flows.copy import copy_image

    def run():
        return copy_image(
            args.source,
            args.destination,
            parallel=args.parallel,
            retries=args.retries,
            retry_delay=args.retry_delay,
            remove_signatures=args.remove_signatures,
            platform=args.platform,
            runner=args.runner,
        )

    summary = _with_progress_bar("copy", run)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(
            f"copied {summary.blobs_copied} blobs "
            f"({summary.bytes_copied / MIB:.1f} MiB), reused {summary.blobs_reused} "
            f"({summary.bytes_reused / MIB:.1f} MiB), {summary.signatures} "
            f"signatures; {summary.destination} now holds {summary.manifest_digest}"
        )
    return EXIT_OK


def run_verify(args) -> int:
    _prepare_prefect(args.verbose)
    from flows.copy import ImageCorrupt, verify_image
    from flows.sync import verify_images

    whole_tree = _holds_images_below(_strip_dir(args.image))
    try:
        if whole_tree:
            reports = verify_images(
                args.image, parallel=args.parallel, runner=args.runner
            )
        else:
            image = verify_image(args.image, parallel=args.parallel, runner=args.runner)
            reports = [image]
    except ImageCorrupt as error:
        for problem in error.problems:
            print(f"dirimage: {problem}", file=sys.stderr)
        if args.json:
            print(json.dumps({"path": error.path, "problems": error.problems}))
        return EXIT_FAILED

    if args.json:
        described = [report.__dict__ for report in reports]
        print(json.dumps(described if whole_tree else described[0], indent=2))
        return EXIT_OK
    for report in reports:
        print(
            f"{report.path}: {report.blobs_checked} blobs "
            f"({report.bytes_checked / MIB:.1f} MiB) intact"
        )
    return EXIT_OK


def _holds_images_below(path: str) -> bool:
    """Whether `path` is a folder that is not itself an image (so maybe a root)."""
    return (
        os.path.isdir(path)
        and not os.path.lexists(os.path.join(path, "manifest.json"))
        and not os.path.lexists(os.path.join(path, "version"))
    )


def run_sync(args) -> int:
    _prepare_prefect(args.verbose)
    from flows.sync import SyncFailed, sync_images

    def run():
        return sync_images(
            args.source,
            args.destination,
            parallel=args.parallel,
            retries=args.retries,
            retry_delay=args.retry_delay,
            prune=args.prune,
            link=args.link,
            runner=args.runner,
        )

    try:
        summary = _with_progress_bar("sync", run)
        status = EXIT_OK
    except SyncFailed as error:
        summary, status = error.summary, EXIT_FAILED
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        for image in summary.images:
            detail = f": {image.error}" if image.error else ""
            print(
                f"{image.status:8} {image.image} "
                f"({image.bytes_from_source / MIB:.1f} MiB from source){detail}"
            )
    for image in summary.failed:
        print(f"dirimage: {image.image}: {image.error}", file=sys.stderr)
    return status


def check_delete(args) -> None:
    """Refuse a folder that is not an image before paying for Prefect's start."""
    path = os.path.abspath(_strip_dir(args.image))
    if os.path.lexists(path):
        from storage.delete import check_deletable

        check_deletable(path)


def run_delete(args) -> int:
    _prepare_prefect(args.verbose)
    from flows.delete import delete_image

    result = delete_image(args.image, wait=args.wait)
    if result.left:
        print(
            f"dirimage: warning: left {len(result.left)} entries in {result.path} "
            f"that are not part of the image: {', '.join(result.left)}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    elif not result.existed:
        print(f"{result.path}: nothing to delete")
    else:
        print(f"{result.path}: deleted {len(result.removed)} files")
    return EXIT_OK


def run_serve(args) -> int:
    _prepare_prefect(verbose=True)
    from flows.serve import ServeConfigError, build_deployments, serve_flows

    try:
        deployments = build_deployments(
            name=args.name,
            scheduled_flow=args.flow,
            cron=args.cron,
            interval=args.interval,
            parameters=dict(args.param),
        )
        serve_flows(deployments, limit=args.limit)
    except ServeConfigError as error:
        print(f"dirimage: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _param(text: str) -> tuple[str, object]:
    from flows.serve import ServeConfigError, parse_param

    try:
        return parse_param(text)
    except ServeConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports a usage error in one line, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"dirimage: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dirimage",
        description="Copy, verify and inspect container images in dir: folders.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe an image as JSON")
    inspect.add_argument("image", metavar="DIR")
    inspect.set_defaults(run=run_inspect)

    copy = commands.add_parser("copy", help="copy an image between two folders")
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("destination", metavar="DST")
    copy.add_argument("--parallel", type=_parallel, default=8, metavar="N")
    copy.add_argument("--retries", type=_retries, default=3, metavar="N")
    copy.add_argument("--retry-delay", type=_seconds, default=1.0, metavar="S")
    copy.add_argument("--remove-signatures", action="store_true")
    copy.add_argument("--platform", type=_platform, metavar="OS/ARCH[/VARIANT]")
    copy.add_argument(
        "--runner",
        type=_runner,
        default=runners.THREAD,
        metavar="RUNNER",
        help=RUNNER_HELP,
    )
    copy.add_argument("--json", action="store_true", help="print the summary as JSON")
    copy.add_argument("-v", "--verbose", action="store_true", help="show Prefect logs")
    copy.set_defaults(run=run_copy, runs_flows=True)

    verify = commands.add_parser("verify", help="check every blob of an image")
    verify.add_argument("image", metavar="DIR")
    verify.add_argument("--parallel", type=_parallel, default=8, metavar="N")
    verify.add_argument(
        "--runner",
        type=_runner,
        default=runners.THREAD,
        metavar="RUNNER",
        help=RUNNER_HELP,
    )
    verify.add_argument("--json", action="store_true")
    verify.add_argument("-v", "--verbose", action="store_true")
    verify.set_defaults(run=run_verify, runs_flows=True)

    sync = commands.add_parser(
        "sync",
        help="mirror every image under a folder into another",
        description=(
            "Copy every image folder under SRC (any depth) to the same path under "
            "DST. Images DST already holds unchanged are skipped; shared blobs are "
            "read once. Exit status 1 when any image failed."
        ),
    )
    sync.add_argument("source", metavar="SRC")
    sync.add_argument("destination", metavar="DST")
    sync.add_argument("--parallel", type=_parallel, default=8, metavar="N")
    sync.add_argument("--retries", type=_retries, default=3, metavar="N")
    sync.add_argument("--retry-delay", type=_seconds, default=1.0, metavar="S")
    sync.add_argument(
        "--prune", action="store_true", help="delete images gone from SRC in DST"
    )
    sync.add_argument(
        "--link",
        action="store_true",
        help="store identical blobs of DST's images once (reflink or hard link)",
    )
    sync.add_argument(
        "--runner",
        type=_runner,
        default=runners.THREAD,
        metavar="RUNNER",
        help=RUNNER_HELP,
    )
    sync.add_argument("--json", action="store_true", help="print the summary as JSON")
    sync.add_argument("-v", "--verbose", action="store_true", help="show Prefect logs")
    sync.set_defaults(run=run_sync, runs_flows=True)

    delete = commands.add_parser(
        "delete",
        help="delete an image folder (its layout files only)",
        description=(
            "Remove the manifests, blobs, signatures, version, lock and temporary "
            "files of the image in DIR, then DIR when it is empty. Other files "
            "stay, with a warning. A missing DIR is not an error."
        ),
    )
    delete.add_argument("image", metavar="DIR")
    delete.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="seconds to wait for a copy into DIR to finish",
    )
    delete.add_argument("--json", action="store_true")
    delete.add_argument("-v", "--verbose", action="store_true")
    delete.set_defaults(run=run_delete, runs_flows=True, check=check_delete)

    serve = commands.add_parser(
        "serve",
        help="serve the flows as Prefect deployments until SIGTERM",
        description=(
            "Register a deployment of each flow with the server named by "
            "PREFECT_API_URL and run what it schedules, until SIGTERM or Ctrl-C. "
            "The schedule and --param defaults belong to the --flow deployment."
        ),
    )
    serve.add_argument(
        "--name", default="serve", help="deployment name (default: serve)"
    )
    serve.add_argument(
        "--flow",
        default="copy-image",
        help="flow that gets the schedule and defaults (default: copy-image)",
    )
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help="cron schedule, e.g. '0 3 * * *'")
    when.add_argument(
        "--interval", type=_positive_float, metavar="SECONDS", help="run every N s"
    )
    serve.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="default parameter, VALUE as JSON or text; repeatable",
    )
    serve.add_argument(
        "--limit", type=_positive, metavar="N", help="at most N runs at once"
    )
    serve.set_defaults(run=run_serve)

    stop_server = commands.add_parser(
        "stop-server",
        help="stop the local Prefect server that commands share",
        description=(
            "With no PREFECT_API_URL, commands share a local Prefect server that "
            f"stops by itself once idle for {temporary_server.IDLE_TIMEOUT_VARIABLE} "
            "seconds (default "
            f"{temporary_server.DEFAULT_IDLE_TIMEOUT:.0f}). This stops it now, "
            "unless a command is using it."
        ),
    )
    stop_server.set_defaults(run=run_stop_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "check", None):
            args.check(args)
        if not getattr(args, "runs_flows", False):
            return args.run(args)
        try:
            temporary_server.idle_timeout()
        except ValueError as error:
            print(f"dirimage: {error}", file=sys.stderr)
            return EXIT_USAGE
        # Importing Prefect leaves about 180,000 tracked objects and about 5,000
        # collectable ones; collecting garbage during that import cost about
        # 0.1 s of every command.
        gc.disable()
        try:
            with _flow_settings(args.verbose):
                import prefect.flows  # noqa: F401

                gc.enable()
                status = args.run(args)
        finally:
            gc.enable()
        # Nothing is collected after this: the process ends, and a last sweep
        # over Prefect's many objects took about a second at exit.
        gc.freeze()
        return status
    except KeyboardInterrupt:
        print("dirimage: interrupted", file=sys.stderr)
        return 130
    except (storage.ImageError, ValueError, OSError) as error:
        print(f"dirimage: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:
        # Failures of Prefect itself (a server that does not start, a parameter
        # it rejects) get one line too; -v shows Prefect's own account of them.
        print(f"dirimage: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILED


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
