"""`dirimage copy` and `dirimage verify` as a user runs them.

Most runs are real processes on Prefect's embedded default: no PREFECT_API_URL,
so Prefect starts its own temporary server, which costs 10 to 20 s a run. The
runs are therefore few, and each checks as much as it can. Runs whose flow
parameters are read back from the API talk to the session's Prefect API instead.
"""

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import imagekit
import prefectapi
import storage

REPOSITORY = Path(__file__).resolve().parent.parent
DIRIMAGE = REPOSITORY / ".venv" / "bin" / "dirimage"
HELLO = REPOSITORY / "tests" / "data" / "hello"
TIMEOUT_SECONDS = 300
MIB = 1024 * 1024


@pytest.fixture
def embedded_env(tmp_path) -> dict[str, str]:
    """An environment with no Prefect API configured and a fresh Prefect home."""
    env = {name: value for name, value in os.environ.items() if "PREFECT" not in name}
    home = tmp_path / "prefect-home"
    home.mkdir()
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def stop_group(process: subprocess.Popen) -> None:
    """Stop what is left of the process and of the temporary server it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(timeout=30)


def run_dirimage(*arguments, env, cwd=None) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [str(DIRIMAGE), *map(str, arguments)],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    finally:
        stop_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def corrupt_first_layer(image: Path) -> str:
    digest = imagekit.read_manifest(image)["layers"][0]["digest"]
    blob = image / digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return digest


def test_readme_command_copies_the_hello_image(embedded_env, tmp_path):
    destination = tmp_path / "hello-copy"

    completed = run_dirimage(
        "copy", "tests/data/hello", destination, env=embedded_env, cwd=REPOSITORY
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    summary_line = r"copied 3 blobs .* now holds sha256:[0-9a-f]{64}\n"
    assert re.fullmatch(summary_line, completed.stdout)
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_copy_prints_a_json_summary(dir_images, embedded_env, tmp_path):
    source = dir_images["signed"]
    destination = tmp_path / "copy"

    completed = run_dirimage(
        "copy", f"dir:{source}", f"dir:{destination}", "--json", env=embedded_env
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    summary = json.loads(completed.stdout)
    assert summary["source"] == str(source)
    assert summary["destination"] == str(destination)
    assert summary["blobs_copied"] == len(imagekit.blob_files(source))
    assert summary["blobs_reused"] == 0
    assert summary["signatures"] == 2
    manifest = (destination / "manifest.json").read_bytes()
    assert summary["manifest_digest"] == str(storage.manifest_digest(manifest))


def test_failed_copy_prints_one_line(fresh_image, embedded_env, tmp_path):
    source = fresh_image("oci")
    digest = corrupt_first_layer(source)

    completed = run_dirimage("copy", source, tmp_path / "copy", env=embedded_env)

    assert completed.returncode == 1
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dirimage: ") and digest in lines[0]
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ["copy", "a", "b", "--parallel", "0"],
        ["copy", "a"],
        ["copy", "a", "b", "--platform", "linux"],
        ["copy", "a", "b", "--retries", "-1"],
        ["verify"],
        ["copy", "a", "b", "--parallel", "300"],
        ["copy", "a", "b", "--retries", "99"],
        ["copy", "a", "b", "--retry-delay", "99999"],
        ["sync", "a", "b", "--parallel", "257"],
        ["sync", "a", "b", "--retries", "51"],
        ["sync", "a", "b", "--retry-delay", "3600.5"],
        ["verify", "a", "--parallel", "300"],
        ["delete", "a", "--wait", "99999"],
    ],
    ids=[
        "parallel-0",
        "no-destination",
        "platform-no-arch",
        "retries",
        "verify",
        "parallel-300",
        "retries-99",
        "retry-delay-99999",
        "sync-parallel",
        "sync-retries",
        "sync-retry-delay",
        "verify-parallel",
        "delete-wait",
    ],
)
def test_usage_errors_exit_2(arguments, embedded_env, tmp_path):
    completed = run_dirimage(*arguments, env=embedded_env, cwd=tmp_path)

    assert completed.returncode == 2
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dirimage: ")
    assert f"see 'dirimage {arguments[0]} --help'" in lines[0]
    assert completed.stdout == ""
    # Refused before Prefect started: it would have made its database here.
    assert os.listdir(tmp_path) == ["prefect-home"]
    assert os.listdir(tmp_path / "prefect-home") == []


def test_out_of_range_values_name_the_bounds(embedded_env, tmp_path):
    completed = run_dirimage(
        "copy", "a", "b", "--parallel", "300", env=embedded_env, cwd=tmp_path
    )

    assert completed.stderr == (
        "dirimage: argument --parallel: must be from 1 to 256, found 300 "
        "(see 'dirimage copy --help')\n"
    )


def test_the_flows_refuse_what_the_command_line_refuses(prefect_api):
    """The flows' bounds and the command line's come from one place."""
    from prefect.utilities.callables import parameter_schema

    import flows
    from flows import parameters

    bounds = {
        "parallel": parameters.PARALLEL,
        "retries": parameters.RETRIES,
        "retry_delay": parameters.SECONDS,
        "retry_jitter": parameters.JITTER,
        "wait": parameters.SECONDS,
    }
    checked = 0
    for name in ("copy_image", "verify_image", "sync_images", "verify_images"):
        schema = parameter_schema(getattr(flows, name)).model_dump_for_openapi()
        for parameter, properties in schema["properties"].items():
            if parameter in bounds:
                expected = bounds[parameter]
                found = (properties["minimum"], properties["maximum"])
                assert found == (expected.low, expected.high), (name, parameter)
                checked += 1
    schema = parameter_schema(flows.delete_image).model_dump_for_openapi()
    wait = schema["properties"]["wait"]
    assert (wait["minimum"], wait["maximum"]) == tuple(parameters.SECONDS)
    assert checked == 10


def test_copy_with_platform_no_signatures_and_a_retry_delay(
    dir_images, cli_env, tmp_path
):
    import prefectapi

    source = dir_images["index"]
    (arm64,) = [
        entry
        for entry in imagekit.read_manifest(source)["manifests"]
        if entry["platform"]["architecture"] == "arm64"
    ]
    destination = tmp_path / "copy"
    arguments = ["--platform", "linux/arm64", "--remove-signatures"]
    arguments += ["--retry-delay", "0.25", "--retries", "2", "--json"]

    completed = run_dirimage("copy", source, destination, *arguments, env=cli_env)

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["manifest_digest"] == arm64["digest"]
    assert summary["signatures"] == 0
    assert list(destination.glob("*.manifest.json")) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")
    (parameters,) = prefectapi.flow_run_parameters(
        "copy-image", "destination", str(destination)
    )
    assert parameters["platform"] == "linux/arm64"
    assert parameters["remove_signatures"] is True
    assert parameters["retry_delay"] == 0.25
    assert parameters["retries"] == 2


def test_copy_without_signatures_on_the_command_line(dir_images, cli_env, tmp_path):
    source = dir_images["signed"]
    destination = tmp_path / "copy"

    completed = run_dirimage(
        "copy", source, destination, "--remove-signatures", "--json", env=cli_env
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["signatures"] == 0
    assert list(source.glob("signature-*"))
    assert list(destination.glob("*signature-*")) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


@pytest.mark.parametrize("frequency", [None, "30"], ids=["default", "set by the user"])
def test_heartbeats_only_when_the_user_sets_their_frequency(
    frequency, cli_env, tmp_path
):
    """Against a server, a command's flow run sends no heartbeats (each would
    make the run wait up to a second at its end) unless the user asked for them."""
    env = dict(cli_env)
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    if frequency is not None:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = frequency
    destination = tmp_path / "copy"

    result = run_dirimage("copy", HELLO, destination, env=env)

    assert result.returncode == 0, result.stderr
    (flow_run_id,) = prefectapi.flow_run_ids(
        "copy-image", "destination", str(destination)
    )
    names = prefectapi.event_names(flow_run_id, until="prefect.flow-run.Completed")
    assert "prefect.flow-run.Completed" in names, names
    heartbeats = names.count("prefect.flow-run.heartbeat")
    assert (heartbeats > 0) == (frequency is not None), names


def readme_setup_command() -> str:
    """The one-line set-up-and-copy command the README gives first."""
    readme = (REPOSITORY / "README.md").read_text()
    (command,) = [
        line for line in readme.splitlines() if line.startswith("python3 -m venv ")
    ]
    return command


@pytest.mark.timeout(1200)
def test_readme_setup_command_in_a_fresh_folder(embedded_env, tmp_path):
    """The README's first command, as a new user runs it: a copy of the checkout,
    a new virtualenv, `pip install .`, then the copy of tests/data/hello."""
    command = readme_setup_command()
    assert " /tmp/hello-copy" in command
    destination = tmp_path / "hello-copy"
    command = command.replace(" /tmp/hello-copy", f" {destination}")
    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPOSITORY,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )

    completed = subprocess.run(
        ["sh", "-c", command],
        cwd=checkout,
        env=embedded_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1100,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    summary_line = r"copied 3 blobs .* now holds sha256:[0-9a-f]{64}"
    assert re.fullmatch(summary_line, completed.stdout.splitlines()[-1])
    assert (checkout / ".venv" / "bin" / "dirimage").exists()
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_verify_of_an_intact_image_exits_0(dir_images, embedded_env):
    completed = run_dirimage("verify", dir_images["index"], env=embedded_env)

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert completed.stdout.startswith(f"{dir_images['index']}: ")
    assert "intact" in completed.stdout


def test_verify_of_a_corrupt_image_exits_1(fresh_image, embedded_env):
    image = fresh_image("v2s2")
    digest = corrupt_first_layer(image)

    completed = run_dirimage("verify", f"dir:{image}", env=embedded_env)

    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dirimage: ") and digest in lines[0]


def read_terminal(master: int, process: subprocess.Popen) -> bytes:
    """Everything the process writes to its terminal, until it exits."""
    output = bytearray()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has gone
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    return bytes(output)


def test_progress_bar_on_a_terminal(embedded_env, tmp_path):
    source = imagekit.write_layered_image(tmp_path / "layered", [8 * MIB] * 4)
    destination = tmp_path / "copy"
    master, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(DIRIMAGE), "copy", str(source), str(destination)],
        env=embedded_env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    try:
        output = read_terminal(master, process).decode(errors="replace")
        process.wait(timeout=TIMEOUT_SECONDS)
    finally:
        stop_group(process)
        os.close(master)

    assert process.returncode == 0, output
    assert re.search(r"copy \[#+\] 100\.0% +32\.\d/32\.\d MiB +\d+\.\d MiB/s", output)
    assert "5/5 blobs" in output
    assert "Traceback" not in output
