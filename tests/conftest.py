"""Shared fixtures: real dir: images built once per session by imagekit."""

import os
from pathlib import Path

import pytest

import imagekit

# Each command of the suite stops its local Prefect server when it ends, rather
# than leaving one behind per test's Prefect home for ten minutes;
# test_shared_server.py tests the shared server that users get by default.
os.environ["DIRIMAGE_SERVER_IDLE_TIMEOUT"] = "0"


@pytest.fixture(scope="session")
def image_factory_dir(tmp_path_factory) -> Path:
    """A session-wide folder where the cached images and their scratch live."""
    return tmp_path_factory.mktemp("image-factory")


@pytest.fixture(scope="session")
def dir_images(image_factory_dir) -> imagekit.DirImageCache:
    """Kind to dir: image path, each built on first access; never modify these."""
    return imagekit.DirImageCache(image_factory_dir)


@pytest.fixture
def fresh_image(dir_images, tmp_path):
    """Return a function that copies a cached image of a kind into tmp_path."""

    def copy_of(kind: str) -> Path:
        destination = tmp_path / kind
        copy_number = 2
        while destination.exists():
            destination = tmp_path / f"{kind}-{copy_number}"
            copy_number += 1
        return imagekit.copy_image(dir_images[kind], destination)

    return copy_of


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API for the whole session, with its own database.

    Flow tests request this so they never touch the user's Prefect home, and so
    the server's start-up cost is paid once.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def cli_env(prefect_api, tmp_path_factory) -> dict[str, str]:
    """Environment for `dirimage` subprocesses that run flows: they talk to the
    session's Prefect API (a first flow within seconds, not a server start per
    process) and keep their Prefect home in a temporary folder."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env
