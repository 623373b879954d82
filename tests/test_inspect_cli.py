"""`dirimage inspect DIR`: the JSON it prints, its one-line errors, and that it
never imports Prefect."""

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import imagekit

TIMEOUT_SECONDS = 60


def dirimage_command() -> list[str]:
    """The installed console script, or the module when it is not installed."""
    script = Path(sys.executable).parent / "dirimage"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "flows.cli"]


def run_inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*dirimage_command(), "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )


def inspect_json(path) -> dict:
    completed = run_inspect(path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    return json.loads(completed.stdout)


def skopeo_manifest_digest(path: Path) -> str:
    skopeo = imagekit.require_tool("skopeo")
    completed = subprocess.run(
        [skopeo, "manifest-digest", str(path / "manifest.json")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=True,
    )
    return completed.stdout.strip()


def blob_file_size(path: Path, digest: str) -> int:
    return next(path.glob(f"{digest[7:]}*")).stat().st_size


@pytest.mark.parametrize(
    "kind, media_type, version, signatures",
    [
        ("oci", imagekit.OCI_MANIFEST, "1.1", 0),
        ("v2s1", imagekit.DOCKER_V2S1_SIGNED, "1.1", 0),
        ("signed", imagekit.DOCKER_V2S2, "1.1", 2),
        ("legacy-1.0", imagekit.DOCKER_V2S2, "1.0", 0),
        ("legacy-2016", imagekit.DOCKER_V2S2, "2016", 0),
    ],
)
def test_single_images(dir_images, kind, media_type, version, signatures):
    """Layout version, digest, type, blob sizes and signature count of an image."""
    path = dir_images[kind]
    description = inspect_json(path)
    assert description["path"] == str(path)
    assert description["layout_version"] == version
    assert description["manifest_digest"] == skopeo_manifest_digest(path)
    assert description["media_type"] == media_type
    assert description["signatures"] == signatures
    assert description["instances"] == []
    assert description["problems"] == []

    blobs = description["blobs"]
    expected_digests = {"sha256:" + p.name[:64] for p in imagekit_blobs(path)}
    assert {blob["digest"] for blob in blobs} == expected_digests
    assert len(blobs) == len(expected_digests)
    for blob in blobs:
        assert blob["present"] is True
        assert blob["size"] == blob_file_size(path, blob["digest"])
    assert description["total_size"] == sum(blob["size"] for blob in blobs)


def imagekit_blobs(path: Path) -> list[Path]:
    """Blob files in either naming (bare hex, or hex.tar in legacy layouts)."""
    return [
        entry
        for entry in path.iterdir()
        if imagekit.BLOB_NAME.fullmatch(entry.name.removesuffix(".tar"))
    ]


@pytest.mark.parametrize(
    "kind, media_type", [("index", imagekit.OCI_INDEX), ("list", imagekit.DOCKER_LIST)]
)
def test_lists_show_instances_with_platforms(dir_images, kind, media_type):
    """A list shows both instances with platforms, and the blobs of both."""
    path = dir_images[kind]
    description = inspect_json(path)
    assert description["media_type"] == media_type
    assert description["manifest_digest"] == skopeo_manifest_digest(path)
    instances = description["instances"]
    assert [i["platform"] for i in instances] == ["linux/amd64", "linux/arm64/v8"]
    for instance in instances:
        assert (path / f"{instance['digest'][7:]}.manifest.json").is_file()
    assert len(description["blobs"]) == len(imagekit_blobs(path))
    assert description["problems"] == []


def test_accepts_a_dir_prefix(dir_images):
    """`dir:PATH` names the same image as PATH, as in skopeo."""
    path = dir_images["oci"]
    assert inspect_json(f"dir:{path}") == inspect_json(path)


def test_missing_blob_is_shown_absent(fresh_image):
    """A deleted blob is listed as not present, with its size from the manifest."""
    path = fresh_image("oci")
    description = inspect_json(path)
    removed = description["blobs"][-1]
    (path / removed["digest"][7:]).unlink()
    after = inspect_json(path)
    assert after["blobs"][-1] == dict(removed, present=False)


def test_missing_instance_is_a_problem(fresh_image):
    """A deleted instance manifest is reported under problems."""
    path = fresh_image("index")
    digest = inspect_json(path)["instances"][0]["digest"]
    (path / f"{digest[7:]}.manifest.json").unlink()
    description = inspect_json(path)
    assert len(description["instances"]) == 1
    assert len(description["problems"]) == 1 and digest in description["problems"][0]


def not_images(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "version").write_text("Directory Transport Version: 1.1\n")
    (garbage / "manifest.json").write_text("{not json")
    return {
        "empty folder": empty,
        "foreign folder": foreign,
        "missing path": tmp_path / "absent",
        "file": a_file,
        "bad manifest": garbage,
    }


@pytest.mark.parametrize(
    "case", ["empty folder", "foreign folder", "missing path", "file", "bad manifest"]
)
def test_not_an_image_exits_2_with_one_line(tmp_path, case):
    """Anything but an image exits 2 with one stderr line naming the path."""
    path = not_images(tmp_path)[case]
    completed = run_inspect(path)
    assert completed.returncode == 2
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dirimage: ")
    assert str(path) in lines[0]


def assert_one_line_usage_error(completed, *needles: str) -> None:
    assert completed.returncode == 2, completed
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dirimage: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_path_with_a_newline_gives_one_line(tmp_path):
    """A path holding a newline is still reported on a single line."""
    folder = tmp_path / "two\nlines"
    folder.mkdir()
    assert_one_line_usage_error(run_inspect(folder), "two lines")


def test_version_linked_to_a_terminal_is_refused_in_one_line(fresh_image):
    """A version file that is a link to /dev/tty is outside the image: refused
    with status 2, never opened."""
    path = fresh_image("oci")
    (path / "version").unlink()
    (path / "version").symlink_to("/dev/tty")
    assert_one_line_usage_error(run_inspect(path), "points outside the image")


def test_version_that_is_a_socket_is_refused_in_one_line(fresh_image):
    """Opening a socket file fails with an OSError of its own; it is reported as
    a file that is not a regular one, with status 2."""
    path = fresh_image("oci")
    (path / "version").unlink()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path / "version"))
        completed = run_inspect(path)
    assert_one_line_usage_error(completed, "not a regular file")


def test_inspect_does_not_import_prefect(dir_images):
    """The inspect command runs without importing Prefect at all."""
    program = (
        "import sys\n"
        "from flows.cli import main\n"
        f"status = main(['inspect', {str(dir_images['signed'])!r}])\n"
        "assert status == 0, status\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')\n"
        "assert not loaded, loaded\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["signatures"] == 2


def test_manifest_digest_is_the_hash_of_the_file_for_oci(dir_images):
    """For an OCI manifest the digest is the sha256 of manifest.json."""
    path = dir_images["oci"]
    data = (path / "manifest.json").read_bytes()
    expected = f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert inspect_json(path)["manifest_digest"] == expected
