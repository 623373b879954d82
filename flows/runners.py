"""Where a flow's blob tasks run: a thread pool here, or a Dask cluster.

A runner is named by a short string, the same on the command line, as a flow or
deployment parameter, and from Python:

- `thread`: the flow's own task runner, a thread pool in the flow's process
  (unless the flow was given another with `flow.with_options(task_runner=...)`).
- `dask`: a temporary Dask cluster on this machine, started for the flow run and
  stopped after it.
- `dask://HOST:PORT`, `tcp://HOST:PORT` or `tls://HOST:PORT`: the running Dask
  cluster whose scheduler listens there.

A flow cannot change its own task runner once called, and a deployment can set
only parameters; so for a Dask runner the flow opens a second task runner for its
blob phase and submits the blob tasks through it, while the rest of the flow (and
the destination's lock) stays in the flow's process. The task runs still belong
to the flow run, and no subflow is created.

This module imports Prefect only inside its functions: the command line checks
`--runner` before Prefect is imported.
"""

import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

THREAD = "thread"
LOCAL_DASK = "dask"
DASK_SCHEMES = ("dask", "tcp", "tls")

# For pydantic, so a deployment's form rejects a bad runner before the run starts.
RUNNER_PATTERN = r"^(thread|dask|(dask|tcp|tls)://[^\s/]+:[0-9]+)$"

INSTALL_HINT = "pip install 'dirimage[dask]'"
LOCAL_DASHBOARD = "127.0.0.1:0"


class RunnerUnavailable(ImportError):
    """A Dask runner was asked for but prefect-dask is not installed."""

    def __init__(self, spec: str):
        super().__init__(
            f"runner {spec!r} needs prefect-dask, which is not installed: "
            f"{INSTALL_HINT}"
        )
        self.spec = spec

    def __reduce__(self):
        return (type(self), (self.spec,))


def check_runner(spec: str) -> str:
    """Return `spec` if it names a runner that can be built here.

    Checks the spelling and, for Dask runners, that prefect-dask is installed,
    without importing Prefect.

    Raises:
        ValueError: `spec` names no runner.
        RunnerUnavailable: A Dask runner and no prefect-dask.
    """
    if not re.fullmatch(RUNNER_PATTERN, spec):
        raise ValueError(
            f"unknown runner {spec!r}: expected 'thread', 'dask', "
            "or a scheduler address such as 'dask://HOST:PORT'"
        )
    if spec != THREAD and not _prefect_dask_installed():
        raise RunnerUnavailable(spec)
    return spec


def scheduler_address(spec: str) -> str | None:
    """The Dask scheduler address `spec` names, or None for `thread` and `dask`."""
    scheme, separator, rest = spec.partition("://")
    if not separator or scheme not in DASK_SCHEMES:
        return None
    return f"{'tcp' if scheme == 'dask' else scheme}://{rest}"


def task_runner_for(spec: str, max_workers: int | None = None) -> Any:
    """A new, unstarted Prefect task runner for `spec`.

    Args:
        spec: `thread`, `dask`, or a scheduler address (see the module notes).
        max_workers: Threads for `thread`; None leaves Prefect's default.

    Returns:
        A `ThreadPoolTaskRunner` or a `prefect_dask.DaskTaskRunner`; pass it to
        `flow.with_options(task_runner=...)`, or enter it yourself.

    Raises:
        ValueError: `spec` names no runner.
        RunnerUnavailable: A Dask runner and no prefect-dask.
    """
    check_runner(spec)
    if spec == THREAD:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)

    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise RunnerUnavailable(spec) from error
    address = scheduler_address(spec)
    if address:
        return DaskTaskRunner(address=address)
    # Dask's default dashboard port, 8787, is often taken (by another cluster);
    # a free port on the loopback interface keeps the temporary cluster private.
    return DaskTaskRunner(cluster_kwargs={"dashboard_address": LOCAL_DASHBOARD})


@contextmanager
def opened_runner(spec: str) -> Iterator[Any]:
    """Start the task runner `spec` names for a phase of the current flow run.

    Yields None for `thread`: tasks then go to the flow's own task runner through
    `task.submit`. Otherwise yields a started Dask task runner, shut down (with
    its temporary cluster, if any) when the block ends. Use it inside a flow.
    """
    if spec == THREAD:
        check_runner(spec)
        yield None
        return
    with task_runner_for(spec) as task_runner:
        yield task_runner


def submit(task_runner: Any, task: Any, **parameters: Any) -> Any:
    """Submit `task` with keyword `parameters`; returns its Prefect future.

    With `task_runner` None this is `task.submit(**parameters)`, on the flow's own
    task runner; otherwise the run goes to `task_runner`, as part of the current
    flow run.
    """
    if task_runner is None:
        return task.submit(**parameters)
    return task_runner.submit(task, parameters)


def _prefect_dask_installed() -> bool:
    try:
        return importlib.util.find_spec("prefect_dask") is not None
    except (ImportError, ValueError):
        return False
