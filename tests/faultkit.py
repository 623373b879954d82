"""Helpers for the fault tests: large synthetic images, the `dirimage` command in a
subprocess, and checks that an image folder holds nothing corrupt.

The synthetic images are complete OCI images (tar layers, a config that lists their
diff IDs, a manifest) written directly in the dir: layout, so a few hundred MiB
take seconds instead of the minutes umoci would need for the same bytes.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
VERSION_1_1 = b"Directory Transport Version: 1.1\n"
MIB = 1024 * 1024
TEMP_PREFIX = ".dirimage-tmp-"
DIRIMAGE = shutil.which("dirimage") or str(
    Path(__file__).parents[1] / ".venv" / "bin" / "dirimage"
)


def _layer_tar(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/{name}")
        info.size = len(content)
        info.mtime = 1704067200
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _write_blob(folder: Path, data: bytes) -> str:
    hex_digest = hashlib.sha256(data).hexdigest()
    (folder / hex_digest).write_bytes(data)
    return f"sha256:{hex_digest}"


def make_synthetic_image(folder: Path | str, layer_sizes: list[int], seed: str) -> Path:
    """Write an OCI image with one layer per size (bytes of pseudo-random data,
    the same for the same seed) into the new folder `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    generator = random.Random(seed)
    layers = []
    for number, size in enumerate(layer_sizes):
        tar = _layer_tar(f"{seed}-{number}.bin", generator.randbytes(size))
        digest = _write_blob(folder, tar)
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(tar)})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Labels": {"seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]},
            "history": [{"created_by": f"layer {n}"} for n in range(len(layers))],
        },
        separators=(",", ":"),
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _write_blob(folder, config),
            "size": len(config),
        },
        "layers": layers,
    }
    (folder / "manifest.json").write_bytes(json.dumps(manifest, indent=2).encode())
    (folder / "version").write_bytes(VERSION_1_1)
    return folder


def manifest_blobs(image: Path | str) -> list[tuple[str, int]]:
    """(digest, size) of the config and every layer of a single-image manifest."""
    document = json.loads((Path(image) / "manifest.json").read_bytes())
    descriptors = [document["config"], *document["layers"]]
    return [(d["digest"], d["size"]) for d in descriptors]


def blob_name(digest: str) -> str:
    return digest.split(":", 1)[1]


def corrupt_blobs(folder: Path | str) -> list[str]:
    """Names of blob files in `folder` whose bytes do not hash to their name."""
    corrupt = []
    for entry in Path(folder).iterdir():
        name = entry.name
        if len(name) != 64 or not entry.is_file():
            continue
        hasher = hashlib.sha256()
        with open(entry, "rb") as file:
            while chunk := file.read(MIB):
                hasher.update(chunk)
        if hasher.hexdigest() != name:
            corrupt.append(name)
    return corrupt


def temporary_files(folder: Path | str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX))


def dirimage(
    env: dict, *arguments: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `dirimage ARGUMENTS` to completion, capturing its output as text."""
    return subprocess.run(
        [DIRIMAGE, *map(str, arguments)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def start_dirimage(env: dict, *arguments: str) -> subprocess.Popen:
    """Start `dirimage ARGUMENTS`; the caller stops it with `stop`."""
    return subprocess.Popen(
        [DIRIMAGE, *map(str, arguments)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def stop(process: subprocess.Popen) -> None:
    """Kill `process` if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=60)


@contextlib.contextmanager
def mounted(options: list[str], where: Path):
    """Run `mount OPTIONS WHERE` for the length of the block, then unmount.

    Mounting needs root: without it (or where the sandbox forbids mounts) the
    test is skipped, and under CI=true it fails instead.
    """

    def cannot(message: str):
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

    if shutil.which("mount") is None or os.geteuid() != 0:
        cannot("mounting needs root and mount(8)")
    where.mkdir(exist_ok=True)
    command = ["mount", *options, str(where)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        cannot(f"cannot {' '.join(command)}: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=60)


def fail_opens(monkeypatch, module, folder: Path, digest: str, failures: int):
    """Count the opens of blob `digest`'s file in the image at `folder` made by
    `module` (a storage module that opens files with `open_inside`), and fail
    the first `failures` of them with EIO.

    Returns the list the opened paths are appended to, one per attempt.
    """
    real_open_inside = module.open_inside
    name = blob_name(digest)
    opened: list[str] = []
    lock = threading.Lock()

    def open_inside(root, path, what):
        if Path(root) == Path(folder) and os.path.basename(path).startswith(name):
            with lock:
                opened.append(path)
                attempt = len(opened)
            if attempt <= failures:
                raise OSError(errno.EIO, "Input/output error (injected)")
        return real_open_inside(root, path, what)

    monkeypatch.setattr(module, "open_inside", open_inside)
    return opened
