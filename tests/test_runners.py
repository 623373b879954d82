"""Runner names: spelling, the task runners they make, and a missing prefect-dask."""

import subprocess
import sys
from pathlib import Path

import pytest

from flows import runners

# Makes `import prefect_dask` fail as it does where the extra is not installed.
WITHOUT_PREFECT_DASK = """
import sys

class HidePrefectDask:
    def find_spec(self, name, path=None, target=None):
        if name == "prefect_dask" or name.startswith("prefect_dask."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HidePrefectDask())
"""


@pytest.mark.parametrize(
    "spec",
    ["thread", "dask", "dask://127.0.0.1:8786", "tcp://scheduler:8786", "tls://h:1"],
)
def test_check_runner_accepts(spec):
    assert runners.check_runner(spec) == spec


@pytest.mark.parametrize(
    "spec",
    ["", "threads", "Dask", "dask://", "dask://host", "http://host:8786", "dask:8786"],
)
def test_check_runner_rejects_with_the_choices(spec):
    with pytest.raises(ValueError, match="expected 'thread', 'dask'"):
        runners.check_runner(spec)


def test_scheduler_address():
    assert runners.scheduler_address("dask://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    assert runners.scheduler_address("tcp://h:1") == "tcp://h:1"
    assert runners.scheduler_address("tls://h:1") == "tls://h:1"
    assert runners.scheduler_address("dask") is None
    assert runners.scheduler_address("thread") is None


def test_task_runners():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    thread = runners.task_runner_for("thread", max_workers=3)
    assert isinstance(thread, ThreadPoolTaskRunner)
    assert thread.duplicate()._max_workers == 3

    remote = runners.task_runner_for("dask://127.0.0.1:8786")
    assert isinstance(remote, DaskTaskRunner)
    assert remote.address == "tcp://127.0.0.1:8786"

    local = runners.task_runner_for("dask")
    assert local.address is None
    assert local.cluster_kwargs == {"dashboard_address": "127.0.0.1:0"}


def test_thread_runner_opens_nothing():
    with runners.opened_runner("thread") as task_runner:
        assert task_runner is None


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PREFECT_DASK + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


def test_missing_prefect_dask_in_python():
    completed = run_python(
        "from flows import runners\n"
        "assert runners.check_runner('thread') == 'thread'\n"
        "runners.task_runner_for('thread')\n"
        "try:\n"
        "    runners.task_runner_for('dask://127.0.0.1:8786')\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == (
        "RunnerUnavailable runner 'dask://127.0.0.1:8786' needs prefect-dask, which "
        "is not installed: pip install 'dirimage[dask]'"
    )


@pytest.mark.parametrize("command", ["copy SRC DST", "verify DIR", "sync SRC DST"])
def test_missing_prefect_dask_on_the_command_line(command):
    arguments = [*command.split(), "--runner", "dask"]
    completed = run_python(
        f"from flows.cli import main\nsys.exit(main({arguments!r}))\n"
    )
    # Refused before any flow ran, so before Prefect was even imported.
    assert completed.returncode == 2
    assert completed.stderr == (
        "dirimage: argument --runner: runner 'dask' needs prefect-dask, which is "
        "not installed: pip install 'dirimage[dask]' "
        f"(see 'dirimage {arguments[0]} --help')\n"
    )
