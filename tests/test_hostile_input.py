"""Hostile input: damaged or malicious images and destinations.

Each case is tried through the storage package and through `dirimage copy`: a clear
error, a non-zero exit with one line on stderr, and nothing written anywhere but the
destination (the folder around source and destination is compared before and after).
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import faultkit
import imagekit
import storage
from storage import layout
from storage.source import (
    MANIFEST_SIZE_LIMIT,
    SIGNATURE_COUNT_LIMIT,
    SIGNATURE_SIZE_LIMIT,
)

CLI_TIMEOUT_SECONDS = 180
DIRIMAGE = shutil.which("dirimage") or str(
    Path(__file__).parents[1] / ".venv" / "bin" / "dirimage"
)


# ---------------------------------------------------------------------------
# Helpers


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under `root` (but not under `skip`) with its kind and content."""
    entries = {}
    for folder, folders, files in os.walk(root):
        if skip is not None and Path(folder) == skip:
            folders.clear()
            continue
        for name in folders + files:
            path = Path(folder) / name
            if skip is not None and path == skip:
                continue
            relative = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entries[relative] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[relative] = ("file", content, stat.S_IMODE(info.st_mode))
            elif stat.S_ISDIR(info.st_mode):
                entries[relative] = ("folder", stat.S_IMODE(info.st_mode))
            else:
                entries[relative] = ("other", stat.S_IFMT(info.st_mode))
    return entries


def run_copy(env: dict, source: Path | str, destination: Path | str):
    return subprocess.run(
        [DIRIMAGE, "copy", str(source), str(destination)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )


def assert_one_line_failure(result, *needles: str) -> str:
    """The command failed with status 1 and a single `dirimage:` line naming each
    needle; returns that line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, found:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("dirimage: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def read_json(path: Path) -> dict:
    return json.loads(path.read_bytes())


def write_json(path: Path, document) -> None:
    path.write_text(json.dumps(document))


def first_layer(image: Path) -> tuple[str, Path]:
    digest = read_json(image / "manifest.json")["layers"][0]["digest"]
    return digest, image / digest.split(":", 1)[1]


def storage_copy(source: str, destination: str) -> None:
    """The copy as the storage package does it, without Prefect, for the storage
    half of each case: plan, blobs, read signatures, instance manifests, staged
    signatures, the top-level manifest, installed signatures, then clean up, in
    the order the copy flow commits."""
    plan = storage.plan_image(source)
    target = storage.DirImageDestination(destination)
    with storage.ImageLock(destination):
        for blob in plan.blobs:
            storage.transfer_blob(
                source, destination, blob.digest, blob.size, blob.optional
            )
        reader = storage.DirImageSource(source)
        signatures = {None: reader.get_signatures(plan.signature_instance)}
        for instance in plan.instances:
            signatures[instance.digest] = reader.get_signatures(instance.digest)
        for instance in plan.instances:
            target.put_manifest(instance.data, instance.digest)
        staged = {
            instance: target.stage_signatures(instance_signatures, instance)
            for instance, instance_signatures in signatures.items()
        }
        target.put_manifest(plan.manifest, None, plan.layout_version)
        for instance, names in staged.items():
            target.install_signatures(names, instance)
        target.remove_unused(plan.digests)


# ---------------------------------------------------------------------------
# Hostile sources: each case damages a private copy of a real image.


@dataclass(frozen=True)
class SourceCase:
    name: str
    kind: str
    damage: Callable[[Path, Path], None]  # (image, folder around it)
    error: type
    needle: str  # a piece of the message that pins down what was wrong


def _edit_manifest(edit):
    def damage(image: Path, _outside: Path) -> None:
        document = read_json(image / "manifest.json")
        edit(document)
        write_json(image / "manifest.json", document)

    return damage


def _replace_manifest(data: bytes):
    def damage(image: Path, _outside: Path) -> None:
        (image / "manifest.json").write_bytes(data)

    return damage


def _truncate_manifest(image: Path, _outside: Path) -> None:
    data = (image / "manifest.json").read_bytes()
    (image / "manifest.json").write_bytes(data[: len(data) // 2])


def _oversize_manifest(image: Path, _outside: Path) -> None:
    data = (image / "manifest.json").read_bytes()
    # Valid JSON padded with whitespace: only the size is wrong.
    (image / "manifest.json").write_bytes(data + b" " * MANIFEST_SIZE_LIMIT)


def _set_layer_digest(make):
    def edit(document):
        digest = document["layers"][0]["digest"]
        document["layers"][0]["digest"] = make(digest.split(":", 1)[1])

    return _edit_manifest(edit)


def _set_instance_digest(make):
    def edit(document):
        digest = document["manifests"][0]["digest"]
        document["manifests"][0]["digest"] = make(digest.split(":", 1)[1])

    return _edit_manifest(edit)


DIGEST_ATTACKS = {
    "dot-dot": (lambda hex_: "sha256:../../../../outside/secret", "sha256:../"),
    "dot-dot-exact-length": (
        lambda hex_: "sha256:" + ("../" * 21 + "x")[:64],
        "sha256:../",
    ),
    "slash-suffix": (lambda hex_: f"sha256:{hex_}/../x", "hex characters"),
    "short": (lambda hex_: f"sha256:{hex_[:-1]}", "63 hex characters"),
    "long": (lambda hex_: f"sha256:{hex_}0", "65 hex characters"),
    "unknown-algorithm": (lambda hex_: f"md5:{hex_[:32]}", "'md5'"),
    "upper-case": (lambda hex_: f"sha256:{hex_.upper()}", "lower-case"),
    "no-algorithm": (lambda hex_: hex_, "no 'algorithm:' prefix"),
}


def _symlink_blob_outside(image: Path, outside: Path) -> None:
    # The link's target holds the right bytes, so only the place is wrong.
    _, blob = first_layer(image)
    secret = outside / "secret-layer"
    shutil.copyfile(blob, secret)
    blob.unlink()
    blob.symlink_to(secret)


def _symlink_manifest_outside(image: Path, outside: Path) -> None:
    secret = outside / "secret-manifest.json"
    shutil.copyfile(image / "manifest.json", secret)
    (image / "manifest.json").unlink()
    (image / "manifest.json").symlink_to(secret)


def _fifo_blob(image: Path, _outside: Path) -> None:
    _, blob = first_layer(image)
    blob.unlink()
    os.mkfifo(blob)


def _fifo_version(image: Path, _outside: Path) -> None:
    (image / "version").unlink()
    os.mkfifo(image / "version")


def _version_link_outside(image: Path, outside: Path) -> None:
    # The outside file holds a valid version line: only the place is wrong.
    secret = outside / "secret-version"
    shutil.copyfile(image / "version", secret)
    (image / "version").unlink()
    (image / "version").symlink_to(secret)


def _oversize_signature(image: Path, _outside: Path) -> None:
    (image / "signature-1").write_bytes(b"\0" * (SIGNATURE_SIZE_LIMIT + 1))


def _too_many_signatures(image: Path, _outside: Path) -> None:
    for number in range(1, SIGNATURE_COUNT_LIMIT + 2):
        (image / f"signature-{number}").write_bytes(b"not checked, only counted")


SOURCE_CASES = [
    SourceCase(
        "truncated-json",
        "oci",
        _truncate_manifest,
        storage.InvalidManifest,
        "not valid JSON",
    ),
    SourceCase(
        "malformed-json",
        "oci",
        _replace_manifest(b"{'schemaVersion': 2}"),
        storage.InvalidManifest,
        "not valid JSON",
    ),
    SourceCase(
        "binary-garbage",
        "oci",
        _replace_manifest(b"\xff\xfe\x00\x01garbage"),
        storage.InvalidManifest,
        "not valid JSON",
    ),
    SourceCase(
        "deeply-nested",
        "oci",
        _replace_manifest(b"[" * 100_000 + b"]" * 100_000),
        storage.InvalidManifest,
        "not valid JSON",
    ),
    SourceCase(
        "array-document",
        "oci",
        _replace_manifest(b"[]"),
        storage.InvalidManifest,
        "must be a JSON object",
    ),
    SourceCase(
        "layers-is-text",
        "oci",
        _edit_manifest(lambda d: d.update(layers="x")),
        storage.InvalidManifest,
        "layers must be a list",
    ),
    SourceCase(
        "layer-is-number",
        "oci",
        _edit_manifest(lambda d: d.update(layers=[7])),
        storage.InvalidManifest,
        "layers[0] must be a JSON object",
    ),
    SourceCase(
        "size-is-text",
        "oci",
        _edit_manifest(lambda d: d["layers"][0].update(size="12")),
        storage.InvalidManifest,
        "size must be a non-negative integer",
    ),
    SourceCase(
        "size-is-negative",
        "oci",
        _edit_manifest(lambda d: d["layers"][0].update(size=-1)),
        storage.InvalidManifest,
        "size must be a non-negative integer",
    ),
    SourceCase(
        "config-missing",
        "oci",
        _edit_manifest(lambda d: d.pop("config")),
        storage.InvalidManifest,
        "config",
    ),
    SourceCase(
        "unknown-schema-version",
        "oci",
        _edit_manifest(lambda d: d.update(schemaVersion=3)),
        storage.InvalidManifest,
        "schemaVersion must be 1 or 2, found 3",
    ),
    SourceCase(
        "unknown-media-type",
        "oci",
        _edit_manifest(lambda d: d.update(mediaType="application/x-unknown")),
        storage.InvalidManifest,
        "unknown mediaType 'application/x-unknown'",
    ),
    SourceCase(
        "manifest-over-cap",
        "oci",
        _oversize_manifest,
        storage.TooLarge,
        f"{MANIFEST_SIZE_LIMIT}-byte limit",
    ),
    *[
        SourceCase(
            f"layer-digest-{name}",
            "oci",
            _set_layer_digest(make),
            storage.InvalidManifest,
            needle,
        )
        for name, (make, needle) in DIGEST_ATTACKS.items()
    ],
    *[
        SourceCase(
            f"instance-digest-{name}",
            "index",
            _set_instance_digest(make),
            storage.InvalidManifest,
            needle,
        )
        for name, (make, needle) in DIGEST_ATTACKS.items()
    ],
    SourceCase(
        "blob-symlink-outside",
        "oci",
        _symlink_blob_outside,
        storage.UnsafePath,
        "points outside the image",
    ),
    SourceCase(
        "manifest-symlink-outside",
        "oci",
        _symlink_manifest_outside,
        storage.UnsafePath,
        "points outside the image",
    ),
    SourceCase(
        "blob-is-fifo",
        "oci",
        _fifo_blob,
        storage.UnsafePath,
        "is not a regular file",
    ),
    SourceCase(
        "version-is-fifo",
        "oci",
        _fifo_version,
        storage.UnsafePath,
        "is not a regular file",
    ),
    SourceCase(
        "version-symlink-outside",
        "oci",
        _version_link_outside,
        storage.UnsafePath,
        "points outside the image",
    ),
    SourceCase(
        "signature-over-cap",
        "signed",
        _oversize_signature,
        storage.TooLarge,
        f"{SIGNATURE_SIZE_LIMIT}-byte limit",
    ),
    SourceCase(
        "too-many-signatures",
        "oci",
        _too_many_signatures,
        storage.TooLarge,
        f"more than {SIGNATURE_COUNT_LIMIT} signatures",
    ),
]
# Every case goes through storage; a representative set also through the command
# line, where each run costs a Prefect flow run of several seconds.
CLI_CASES = [
    "truncated-json",
    "unknown-media-type",
    "manifest-over-cap",
    "layer-digest-dot-dot",
    "instance-digest-upper-case",
    "blob-symlink-outside",
    "version-is-fifo",
    "version-symlink-outside",
    "too-many-signatures",
]
CASES_BY_NAME = {case.name: case for case in SOURCE_CASES}


@pytest.fixture
def hostile_source(fresh_image, tmp_path):
    """Return a function that builds the damaged source of a case; it returns the
    image and the folder beside it where outside files live."""

    def build(case: SourceCase) -> tuple[Path, Path]:
        image = fresh_image(case.kind)
        outside = tmp_path / "outside"
        outside.mkdir(exist_ok=True)
        (outside / "keep.txt").write_text("a file no copy may touch\n")
        case.damage(image, outside)
        return image, outside

    return build


@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda case: case.name)
def test_storage_refuses_hostile_source(case, hostile_source, tmp_path):
    image, _ = hostile_source(case)
    destination = tmp_path / "destination"
    before = snapshot(tmp_path, skip=destination)

    with pytest.raises(case.error) as caught:
        storage_copy(str(image), str(destination))

    assert case.needle in str(caught.value)
    assert "\n" not in str(caught.value)
    assert snapshot(tmp_path, skip=destination) == before
    if destination.exists():
        # Whatever landed is ours: layout files only, no manifest of a half image.
        names = os.listdir(destination)
        assert all(layout.layout_kind(name) for name in names), names
        assert "manifest.json" not in names


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_refuses_hostile_source(name, hostile_source, tmp_path, cli_env):
    case = CASES_BY_NAME[name]
    image, _ = hostile_source(case)
    destination = tmp_path / "destination"
    before = snapshot(tmp_path, skip=destination)

    result = run_copy(cli_env, image, destination)

    assert_one_line_failure(result, case.needle)
    assert snapshot(tmp_path, skip=destination) == before
    if destination.exists():
        assert "manifest.json" not in os.listdir(destination)


def test_storage_rejects_a_damaged_manifest_of_every_kind(dir_images):
    """Truncating any real manifest, of every kind, gives InvalidManifest."""
    for kind in ("oci", "v2s2", "v2s1", "index", "list", "signed"):
        # Without trailing whitespace, so that every cut removes JSON.
        data = (dir_images[kind] / "manifest.json").read_bytes().rstrip()
        for cut in (1, len(data) // 3, len(data) - 1):
            with pytest.raises(storage.InvalidManifest):
                storage.parse_manifest(data[:cut])


# ---------------------------------------------------------------------------
# Signatures in bulk


def test_five_hundred_signatures_are_copied(fresh_image, tmp_path, cli_env):
    image = fresh_image("oci")
    signatures = {n: f"signature number {n}\n".encode() for n in range(1, 501)}
    for number, content in signatures.items():
        (image / f"signature-{number}").write_bytes(content)
    destination = tmp_path / "destination"

    result = run_copy(cli_env, image, destination)

    assert result.returncode == 0, result.stderr
    assert "500 signatures" in result.stdout
    for number, content in signatures.items():
        assert (destination / f"signature-{number}").read_bytes() == content
    assert not (destination / "signature-501").exists()
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


# ---------------------------------------------------------------------------
# Hostile destinations


def test_destination_that_is_a_file_is_refused(fresh_image, tmp_path, cli_env):
    image = fresh_image("oci")
    destination = tmp_path / "a-file"
    destination.write_bytes(b"not an image folder\n")
    before = snapshot(tmp_path)

    with pytest.raises(storage.NotAnImage, match="is not a folder"):
        storage_copy(str(image), str(destination))
    assert snapshot(tmp_path) == before

    result = run_copy(cli_env, image, destination)
    assert_one_line_failure(result, str(destination), "is not a folder")
    assert snapshot(tmp_path) == before


def _foreign_folder(folder: Path) -> None:
    """A folder of someone else's files, some named like layout files."""
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / ("a" * 64)).write_bytes(b"a file whose name looks like a blob\n")
    (folder / "signature-1").write_bytes(b"not a signature\n")
    (folder / "version").write_text("my program's version: 3\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(os.urandom(1000))


def test_non_empty_folder_that_is_not_an_image_is_left_untouched(
    fresh_image, tmp_path, cli_env
):
    image = fresh_image("oci")
    destination = tmp_path / "foreign"
    _foreign_folder(destination)
    before = snapshot(tmp_path)

    with pytest.raises(storage.FolderNotEmpty, match="refusing to write into it"):
        storage_copy(str(image), str(destination))
    assert snapshot(tmp_path) == before

    result = run_copy(cli_env, image, destination)
    assert_one_line_failure(result, str(destination), "holds no dir: image")
    assert snapshot(tmp_path) == before


def test_copy_onto_itself_is_refused(fresh_image, tmp_path, cli_env):
    image = fresh_image("oci")
    link = tmp_path / "same-image"
    link.symlink_to(image)
    before = snapshot(tmp_path)

    for destination in (image, link, f"dir:{image}"):
        result = run_copy(cli_env, image, destination)
        assert_one_line_failure(result, "onto itself")
    assert snapshot(tmp_path) == before


def test_copy_into_a_folder_inside_the_source_is_refused(
    fresh_image, tmp_path, cli_env
):
    image = fresh_image("oci")
    before = snapshot(tmp_path)

    result = run_copy(cli_env, image, image / "inner")

    assert_one_line_failure(result, "a folder inside it")
    assert snapshot(tmp_path) == before


def test_copy_into_the_source_through_a_bind_mount_is_refused(
    fresh_image, tmp_path, cli_env
):
    """A bind mount gives the source a second path; the copy still sees it is
    the same folder, by device and inode."""
    image = fresh_image("oci")
    before = snapshot(image)
    second_path = tmp_path.parent / f"{tmp_path.name}-view"

    with faultkit.mounted(["--bind", str(image.parent)], second_path) as view:
        onto_itself = run_copy(cli_env, image, view / image.name)
        into_itself = run_copy(cli_env, image, view / image.name / "inner")

    assert_one_line_failure(onto_itself, "onto itself")
    assert_one_line_failure(into_itself, "a folder inside it")
    assert snapshot(image) == before


def _plant_links(destination: Path, outside: Path, digest: str) -> dict[str, Path]:
    """Links in an image folder that point at files outside it, where a careless
    writer would write through them."""
    targets = {}
    for name in (
        layout.LOCK_FILE,
        "manifest.json",
        "signature-1",
        digest.split(":", 1)[1],
    ):
        target = outside / f"target-of-{name}"
        target.write_bytes(f"outside file behind {name}\n".encode())
        link = destination / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(target)
        targets[name] = target
    return targets


def test_links_planted_in_the_destination_are_not_written_through(
    fresh_image, dir_images, tmp_path, cli_env
):
    """A destination image whose lock file, manifest, signature and a needed blob
    are links to outside files: the copy replaces the links, never the files."""
    source = fresh_image("signed")
    outside = tmp_path / "outside"
    outside.mkdir()
    digest, _ = first_layer(source)
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")
    _plant_links(destination, outside, digest)
    before = snapshot(outside)

    with pytest.raises(storage.UnsafePath, match="lock file .* symbolic link"):
        storage_copy(str(source), str(destination))
    result = run_copy(cli_env, source, destination)
    assert_one_line_failure(result, layout.LOCK_FILE, "symbolic link")
    assert snapshot(outside) == before

    # Without the planted lock, the copy goes through and replaces every link.
    (destination / layout.LOCK_FILE).unlink()
    result = run_copy(cli_env, source, destination)

    assert result.returncode == 0, result.stderr
    assert snapshot(outside) == before
    for name in ("manifest.json", "signature-1", digest.split(":", 1)[1]):
        assert not (destination / name).is_symlink(), name
    assert (destination / "manifest.json").read_bytes() == (
        source / "manifest.json"
    ).read_bytes()
    assert storage.check_image(str(destination)) == []
