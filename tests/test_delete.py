"""Deleting an image folder: exactly the layout files, refusing what is not ours."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from storage.delete import delete_image
from storage.lock import ImageLock


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its inode, size and modification time."""
    snapshot = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            snapshot[os.path.relpath(path, root)] = (
                info.st_ino,
                info.st_size,
                info.st_mtime_ns,
            )
    return snapshot


def web_app_folder(folder: Path) -> Path:
    """A web app's files: its manifest.json is a web app manifest."""
    folder.mkdir(parents=True)
    manifest = {
        "name": "Shop",
        "short_name": "Shop",
        "start_url": "/",
        "display": "standalone",
        "icons": [{"src": "icon.png", "sizes": "192x192", "type": "image/png"}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "index.html").write_text("<!doctype html><title>Shop</title>\n")
    return folder


def docker_save_folder(folder: Path) -> Path:
    """What `docker save` writes: a manifest.json that is a JSON array, a config
    named by its hex, one folder per layer."""
    folder.mkdir(parents=True)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
    config_hex = hashlib.sha256(config).hexdigest()
    layer_hex = hashlib.sha256(b"layer").hexdigest()
    (folder / f"{config_hex}.json").write_bytes(config)
    (folder / layer_hex).mkdir()
    (folder / layer_hex / "VERSION").write_text("1.0")
    (folder / layer_hex / "json").write_text("{}")
    (folder / layer_hex / "layer.tar").write_bytes(b"layer")
    manifest = [
        {
            "Config": f"{config_hex}.json",
            "RepoTags": ["shop:latest"],
            "Layers": [f"{layer_hex}/layer.tar"],
        }
    ]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "repositories").write_text(json.dumps({"shop": {"latest": layer_hex}}))
    return folder


FOREIGN_FOLDERS = {"web-app": web_app_folder, "docker-save": docker_save_folder}


def content_snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def test_delete_removes_every_layout_file_and_the_folder(fresh_image):
    image = fresh_image("index")
    (image / ".dirimage-tmp-leftover").write_bytes(b"half a blob")
    (image / "dir-put-blob123456").write_bytes(b"skopeo's half a blob")
    (image / ".dirimage.lock").write_bytes(b"")
    names = set(os.listdir(image))

    result = delete_image(str(image))

    assert not image.exists()
    assert result.existed and result.folder_removed
    assert set(result.removed) == names
    assert result.removed[0] == "manifest.json"
    assert result.left == ()


def test_delete_leaves_unknown_files_and_reports_them(fresh_image):
    image = fresh_image("oci")
    (image / "notes.txt").write_text("mine")
    (image / "sub").mkdir()
    (image / "sub" / "data").write_text("also mine")

    result = delete_image(str(image))

    assert result.left == ("notes.txt", "sub")
    assert not result.folder_removed
    assert sorted(os.listdir(image)) == ["notes.txt", "sub"]
    assert (image / "sub" / "data").read_text() == "also mine"


def test_delete_twice_is_not_an_error(fresh_image):
    image = fresh_image("v2s2")
    delete_image(str(image))

    again = delete_image(str(image))

    assert not again.existed
    assert again.removed == ()


def test_delete_refuses_a_folder_that_is_not_an_image(tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "report.txt").write_text("precious")
    blob_like = "a" * 64
    (folder / blob_like).write_text("looks like a blob, but no image here")
    before = tree_snapshot(folder)

    with pytest.raises(storage.NotAnImage):
        delete_image(str(folder))

    assert tree_snapshot(folder) == before


@pytest.mark.parametrize("kind", FOREIGN_FOLDERS)
def test_delete_refuses_a_folder_whose_manifest_json_is_not_an_image(tmp_path, kind):
    """Without a version file, only a manifest that parses as an image manifest
    makes a folder an image; a web app or `docker save` output is left whole."""
    folder = FOREIGN_FOLDERS[kind](tmp_path / kind)
    before = content_snapshot(folder)

    with pytest.raises(storage.NotAnImage, match="manifest.json"):
        delete_image(str(folder))

    assert content_snapshot(folder) == before


def test_delete_refuses_a_file_and_an_empty_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()

    with pytest.raises(storage.NotAnImage):
        delete_image(str(tmp_path / "file"))
    with pytest.raises(storage.NotAnImage):
        delete_image(str(tmp_path / "empty"))
    assert (tmp_path / "file").read_text() == "x"
    assert (tmp_path / "empty").is_dir()


def test_delete_waits_for_no_one_while_a_copy_holds_the_lock(fresh_image):
    image = fresh_image("oci")
    before = tree_snapshot(image)

    with ImageLock(str(image)):
        with pytest.raises(storage.ImageBusy):
            delete_image(str(image))

    assert set(tree_snapshot(image)) == set(before) | {".dirimage.lock"}


def test_delete_leaves_the_other_images_untouched(dir_images, tmp_path):
    root = tmp_path / "root"
    for relative, kind in (("a", "oci"), ("a-b", "v2s2"), ("deep/a", "index")):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(dir_images[kind], root / relative)
    before = tree_snapshot(root)

    delete_image(str(root / "a"))

    after = tree_snapshot(root)
    assert not (root / "a").exists()
    assert after == {
        path: value
        for path, value in before.items()
        if path != "a" and not path.startswith("a/")
    }


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_delete_image_flow_warns_about_unknown_files(fresh_image, prefect_api):
    from flows.delete import delete_image as delete_image_flow

    image = fresh_image("oci")
    (image / "keep.me").write_text("not ours")
    # Prefect's run loggers do not propagate to the root logger caplog watches.
    handler = RecordingHandler()
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(handler)
    try:
        result = delete_image_flow(str(image))
    finally:
        flow_logger.removeHandler(handler)

    assert result.left == ("keep.me",)
    assert any(
        "keep.me" in record.getMessage() and record.levelno == logging.WARNING
        for record in handler.records
    )
    assert delete_image_flow(str(image / "missing")).existed is False


@pytest.mark.parametrize("kind", FOREIGN_FOLDERS)
def test_delete_image_flow_refuses_a_foreign_manifest_json(tmp_path, prefect_api, kind):
    from flows.delete import delete_image as delete_image_flow

    folder = FOREIGN_FOLDERS[kind](tmp_path / kind)
    before = content_snapshot(folder)

    with pytest.raises(storage.NotAnImage):
        delete_image_flow(str(folder))

    assert content_snapshot(folder) == before


@pytest.mark.parametrize("kind", FOREIGN_FOLDERS)
def test_dirimage_delete_command_refuses_a_foreign_manifest_json(tmp_path, kind):
    folder = FOREIGN_FOLDERS[kind](tmp_path / kind)
    before = content_snapshot(folder)
    environment = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    environment.pop("PREFECT_API_URL", None)

    refused = subprocess.run(
        [sys.executable, "-m", "flows.cli", "delete", f"dir:{folder}"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )

    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dirimage: refusing to delete")
    assert content_snapshot(folder) == before


def test_dirimage_delete_command(fresh_image, tmp_path):
    image = fresh_image("v2s2")
    (image / "keep.me").write_text("not ours")
    not_an_image = tmp_path / "plain"
    not_an_image.mkdir()
    (not_an_image / "file").write_text("x")
    environment = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    environment.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "delete"]

    deleted = subprocess.run(
        [*command, str(image)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    refused = subprocess.run(
        [*command, str(not_an_image)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )

    assert deleted.returncode == 0, deleted.stderr
    assert "warning" in deleted.stderr and "keep.me" in deleted.stderr
    assert os.listdir(image) == ["keep.me"]
    assert refused.returncode == 1
    assert "not a dir: image" in refused.stderr
    assert (not_an_image / "file").read_text() == "x"
