"""Build real container images in skopeo's dir: layout for the test suite.

Every image is made by the real tools: umoci assembles OCI image layouts from
files written here, skopeo copies them into dir: layouts (converting the
manifest format on the way), and gpg plus skopeo sign them. Nothing is
downloaded; every file that a function creates stays inside the working
directory it was given.

Each kind of image that make_dir_image knows is listed in KINDS. The signed
kind also records how to verify it: read_signing_info returns the GNUPGHOME,
key fingerprint and signed identity, read from a "<image>.signing.json" file
written beside the image directory.

Run as a script to write one kind of image into a directory, which is how the
checked-in data under tests/data was made:

    python tests/imagekit.py oci tests/data/hello
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

KINDS = (
    "oci",
    "v2s2",
    "v2s1",
    "index",
    "list",
    "signed",
    "legacy-1.0",
    "legacy-2016",
)
LEGACY_KINDS = ("legacy-1.0", "legacy-2016")
MULTI_INSTANCE_KINDS = ("index", "list")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V2S1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V2S1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# The media type each kind's manifest.json turns out to have, as skopeo wrote it.
KIND_MEDIA_TYPES = {
    "oci": OCI_MANIFEST,
    "v2s2": DOCKER_V2S2,
    "v2s1": DOCKER_V2S1_SIGNED,
    "index": OCI_INDEX,
    "list": DOCKER_LIST,
    "signed": DOCKER_V2S2,
    "legacy-1.0": DOCKER_V2S2,
    "legacy-2016": DOCKER_V2S2,
}

DIR_VERSION_1_1 = "Directory Transport Version: 1.1\n"
DIR_VERSION_1_0 = "Directory Transport Version: 1.0\n"

# skopeo cannot sign for a dir: destination without an explicit identity,
# because a directory has no registry reference to default to.
SIGN_IDENTITY = "registry.example/dirimage/signed:v1"

# Fixed times keep the layer tars and configs byte-identical between builds.
FIXED_CREATED = "2024-01-01T00:00:00Z"
FIXED_MTIME = 1704067200

COMMAND_TIMEOUT_SECONDS = 300
INDEX_TAG = "multi"
BLOB_NAME = re.compile(r"[0-9a-f]{64}")
SIGNATURE_NAME = re.compile(r"signature-[1-9][0-9]*")
INSTANCE_MANIFEST_NAME = re.compile(r"[0-9a-f]{64}\.manifest\.json")


class ToolError(RuntimeError):
    """A command exited with a non-zero status; the message carries its stderr."""

    def __init__(self, command: list[str], returncode: int, stderr: str):
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(
            f"{' '.join(command)} exited with status {returncode}:\n{stderr.strip()}"
        )


class SigningKey(NamedTuple):
    """A throwaway gpg key: the GNUPGHOME holding it and its fingerprint."""

    gnupghome: Path
    fingerprint: str


@dataclass(frozen=True)
class SignedImage:
    """A signed dir: image and what is needed to verify its signatures."""

    path: Path
    gnupghome: Path
    fingerprint: str
    identity: str
    signatures: tuple[Path, ...]

    def signs(self, image: Path | str, signature_name: str = "signature-1") -> bool:
        """Whether `image`'s signature of that name verifies with this key and
        identity against `image`'s own manifest (see `verify_signature`)."""
        image = Path(image)
        return verify_signature(
            self.gnupghome,
            image / "manifest.json",
            self.identity,
            self.fingerprint,
            image / signature_name,
        )


def require_tool(name: str) -> str:
    """Return the path of an external tool, or skip (fail under CI) without it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; the image factory needs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def tool_env(
    workdir: Path | str, gnupghome: Path | str | None = None
) -> dict[str, str]:
    """Return an environment for the tools that needs no TTY and no desktop.

    Temporary files go to a folder inside workdir rather than /var/tmp.
    """
    temporary = Path(workdir) / "tmp"
    temporary.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for variable in ("GPG_TTY", "GPG_AGENT_INFO", "DISPLAY", "WAYLAND_DISPLAY"):
        env.pop(variable, None)
    env["TMPDIR"] = str(temporary)
    if gnupghome is not None:
        env["GNUPGHOME"] = str(gnupghome)
    return env


def run_tool(
    command: list[str],
    env: dict[str, str] | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a command with captured bytes output; raise ToolError when it fails."""
    completed = subprocess.run(
        command,
        input=input_text.encode() if input_text is not None else None,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    if completed.returncode != 0:
        raise ToolError(
            [str(part) for part in command],
            completed.returncode,
            completed.stderr.decode(errors="replace"),
        )
    return completed


def pseudo_random_bytes(seed: str, size: int) -> bytes:
    """Return size bytes that are the same for the same seed on every run."""
    return random.Random(seed).randbytes(size)


def default_layer_files(name: str, arch: str, os_: str) -> list[dict[str, bytes]]:
    """Return the contents of the two layers every built image has."""
    first_layer = {
        "etc/dirimage/hello.txt": f"Hello from the {name} test image.\n".encode(),
        "usr/share/dirimage/noise-1.bin": pseudo_random_bytes(f"{name}/1", 3072),
    }
    second_layer = {
        "etc/dirimage/platform.txt": f"{os_}/{arch}\n".encode(),
        "usr/share/dirimage/noise-2.bin": pseudo_random_bytes(f"{name}/2", 1024),
    }
    return [first_layer, second_layer]


def build_oci_layout(
    workdir: Path | str,
    name: str = "base",
    arch: str = "amd64",
    os_: str = "linux",
    files: Mapping[str, bytes | str] | None = None,
) -> str:
    """Build a tagged image with umoci and return "LAYOUTPATH:TAG" for skopeo.

    The OCI layout is workdir/layout, created on first use, so calling this
    again with another name adds a second image to the same layout. The image
    gets two layers of text and pseudo-random files, plus a third layer holding
    files (paths inside the image mapped to their content) when given.
    """
    umoci = require_tool("umoci")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = tool_env(workdir)
    layout = workdir / "layout"
    image = f"{layout}:{name}"
    if not (layout / "index.json").exists():
        run_tool([umoci, "init", "--layout", str(layout)], env=env)
    run_tool([umoci, "new", "--image", image], env=env)

    layers = default_layer_files(name, arch, os_)
    if files:
        layers.append(
            {
                path: content.encode() if isinstance(content, str) else content
                for path, content in files.items()
            }
        )
    for number, layer_files in enumerate(layers, start=1):
        bundle = workdir / f"bundle-{name}-{number}"
        run_tool(
            [umoci, "unpack", "--rootless", "--image", image, str(bundle)], env=env
        )
        rootfs = bundle / "rootfs"
        for relative_path, content in layer_files.items():
            target = rootfs / relative_path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        _set_fixed_mtimes(rootfs)
        run_tool(
            [
                umoci,
                "repack",
                "--history.created",
                FIXED_CREATED,
                "--history.created_by",
                f"imagekit layer {number}",
                "--image",
                image,
                str(bundle),
            ],
            env=env,
        )
        shutil.rmtree(bundle)

    run_tool(
        [
            umoci,
            "config",
            "--architecture",
            arch,
            "--os",
            os_,
            "--created",
            FIXED_CREATED,
            "--history.created",
            FIXED_CREATED,
            "--image",
            image,
        ],
        env=env,
    )
    return image


def _set_fixed_mtimes(root: Path) -> None:
    for directory, _, file_names in os.walk(root):
        for file_name in file_names:
            os.utime(Path(directory) / file_name, (FIXED_MTIME, FIXED_MTIME))
        os.utime(directory, (FIXED_MTIME, FIXED_MTIME))


def add_oci_index(
    layout_reference: str, platforms: Mapping[str, dict], index_tag: str = INDEX_TAG
) -> str:
    """Tag an image index over already tagged images of one OCI layout.

    platforms maps each image's tag to its platform object. The index is
    written as a blob and referenced from index.json under index_tag; the
    return value is "LAYOUTPATH:INDEX_TAG".
    """
    layout = Path(layout_reference.rpartition(":")[0] or layout_reference)
    layout_index_path = layout / "index.json"
    layout_index = json.loads(layout_index_path.read_text())
    descriptors_by_tag = {
        descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name"): (
            descriptor
        )
        for descriptor in layout_index["manifests"]
    }

    instances = []
    for tag, platform in platforms.items():
        descriptor = descriptors_by_tag[tag]
        instances.append(
            {
                "mediaType": descriptor["mediaType"],
                "digest": descriptor["digest"],
                "size": descriptor["size"],
                "platform": dict(platform),
            }
        )
    index_bytes = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": instances},
        separators=(",", ":"),
    ).encode()
    index_hex = hashlib.sha256(index_bytes).hexdigest()
    (layout / "blobs" / "sha256" / index_hex).write_bytes(index_bytes)

    layout_index["manifests"].append(
        {
            "mediaType": OCI_INDEX,
            "digest": f"sha256:{index_hex}",
            "size": len(index_bytes),
            "annotations": {"org.opencontainers.image.ref.name": index_tag},
        }
    )
    layout_index_path.write_text(json.dumps(layout_index, separators=(",", ":")))
    return f"{layout}:{index_tag}"


def skopeo_copy_to_dir(
    source: str,
    destination: Path | str,
    workdir: Path | str,
    extra_args: list[str] | tuple[str, ...] = (),
    gnupghome: Path | str | None = None,
) -> Path:
    """Copy an image (any skopeo image name) into a new dir: layout."""
    skopeo = require_tool("skopeo")
    destination = Path(destination)
    run_tool(
        [
            skopeo,
            "--insecure-policy",
            "copy",
            "--quiet",
            *extra_args,
            source,
            f"dir:{destination}",
        ],
        env=tool_env(workdir, gnupghome),
    )
    return destination


def make_dir_image(workdir: Path | str, kind: str) -> Path:
    """Build one kind of dir: image as workdir/KIND and return its path.

    Scratch files for it go to workdir/KIND.build. See KINDS for the kinds.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {KINDS}")
    workdir = Path(workdir)
    output = workdir / kind
    if output.exists():
        raise FileExistsError(f"{output} already exists")
    scratch = workdir / f"{kind}.build"

    if kind in ("oci", "v2s2", "v2s1"):
        layout_image = build_oci_layout(scratch, name=kind)
        return skopeo_copy_to_dir(
            f"oci:{layout_image}", output, workdir, ["--format", kind]
        )
    if kind in MULTI_INSTANCE_KINDS:
        return _make_multi_instance_image(scratch, output, workdir, kind)
    if kind == "signed":
        return make_signed_image(workdir).path
    return _make_legacy_image(scratch, output, workdir, kind)


def _make_multi_instance_image(
    scratch: Path, output: Path, workdir: Path, kind: str
) -> Path:
    # umoci 0.4.7 cannot set a variant in the image config, so the arm64
    # variant exists only in the index, which is where platform choice happens.
    build_oci_layout(scratch, name="amd64", arch="amd64")
    layout_image = build_oci_layout(scratch, name="arm64", arch="arm64")
    index_image = add_oci_index(
        layout_image,
        {
            "amd64": {"architecture": "amd64", "os": "linux"},
            "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
        },
    )

    # skopeo 1.9.3 turns the OCI index into a Docker manifest list itself
    # when asked for v2s2, converting every instance as well.
    extra_args = ["--all"] if kind == "index" else ["--all", "--format", "v2s2"]
    return skopeo_copy_to_dir(f"oci:{index_image}", output, workdir, extra_args)


def _make_legacy_image(scratch: Path, output: Path, workdir: Path, kind: str) -> Path:
    layout_image = build_oci_layout(scratch, name=kind)
    skopeo_copy_to_dir(f"oci:{layout_image}", output, workdir, ["--format", "v2s2"])

    # Early releases of the dir transport stored every blob as HEX.tar.
    for blob in blob_files(output):
        blob.rename(blob.with_name(f"{blob.name}.tar"))
    version_file = output / "version"
    if kind == "legacy-1.0":
        version_file.write_text(DIR_VERSION_1_0)
    else:
        version_file.unlink()
    return output


@contextmanager
def gpg_agent_stopped_afterwards(gnupghome: Path | str) -> Iterator[None]:
    """Stop any gpg-agent serving gnupghome when the block ends."""
    try:
        yield
    finally:
        gpgconf = shutil.which("gpgconf")
        if gpgconf is not None:
            subprocess.run(
                [gpgconf, "--homedir", str(gnupghome), "--kill", "gpg-agent"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )


def make_gpg_key(workdir: Path | str) -> SigningKey:
    """Create a passphrase-less signing key in a new GNUPGHOME inside workdir.

    Returns (gnupghome, fingerprint). The agent that key generation starts is
    stopped before returning.
    """
    gpg = require_tool("gpg")
    require_tool("gpgconf")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gnupghome = Path(tempfile.mkdtemp(prefix="gnupg-", dir=workdir))

    # Loopback pinentry makes any unexpected passphrase prompt fail at once
    # instead of waiting for a terminal that is not there.
    (gnupghome / "gpg.conf").write_text("pinentry-mode loopback\n")
    (gnupghome / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
    key_parameters = (
        "%no-protection\n"
        "Key-Type: RSA\n"
        "Key-Length: 2048\n"
        "Key-Usage: sign\n"
        "Name-Real: dirimage test signer\n"
        "Name-Email: signer@dirimage.invalid\n"
        "Expire-Date: 0\n"
        "%commit\n"
    )
    env = tool_env(workdir, gnupghome)
    with gpg_agent_stopped_afterwards(gnupghome):
        run_tool([gpg, "--batch", "--gen-key", "-"], env=env, input_text=key_parameters)
        listing = run_tool(
            [gpg, "--batch", "--with-colons", "--list-secret-keys"], env=env
        ).stdout.decode()

    fingerprints = [
        line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
    ]
    if not fingerprints:
        raise ToolError(["gpg", "--list-secret-keys"], 0, listing)
    return SigningKey(gnupghome, fingerprints[0])


def make_signed_image(workdir: Path | str) -> SignedImage:
    """Build workdir/signed, a v2s2 dir: image with two simple signatures.

    signature-1 comes from skopeo copy --sign-by, signature-2 from skopeo
    standalone-sign; both sign SIGN_IDENTITY with a fresh key. The details
    are also saved to workdir/signed.signing.json for read_signing_info.
    """
    skopeo = require_tool("skopeo")
    workdir = Path(workdir)
    output = workdir / "signed"
    if output.exists():
        raise FileExistsError(f"{output} already exists")
    key = make_gpg_key(workdir)
    layout_image = build_oci_layout(workdir / "signed.build", name="signed")

    with gpg_agent_stopped_afterwards(key.gnupghome):
        skopeo_copy_to_dir(
            f"oci:{layout_image}",
            output,
            workdir,
            [
                "--format",
                "v2s2",
                "--sign-by",
                key.fingerprint,
                "--sign-identity",
                SIGN_IDENTITY,
            ],
            gnupghome=key.gnupghome,
        )
        run_tool(
            [
                skopeo,
                "standalone-sign",
                str(output / "manifest.json"),
                SIGN_IDENTITY,
                key.fingerprint,
                "--output",
                str(output / "signature-2"),
            ],
            env=tool_env(workdir, key.gnupghome),
        )

    signed = SignedImage(
        path=output,
        gnupghome=key.gnupghome,
        fingerprint=key.fingerprint,
        identity=SIGN_IDENTITY,
        signatures=(output / "signature-1", output / "signature-2"),
    )
    _signing_info_path(output).write_text(
        json.dumps(asdict(signed), default=str, indent=2) + "\n"
    )
    return signed


def _signing_info_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.name}.signing.json")


def read_signing_info(image_path: Path | str) -> SignedImage:
    """Return the signing details saved beside a signed image (or its copy).

    The signature paths point into image_path, so they follow the copy.
    """
    image_path = Path(image_path)
    saved = json.loads(_signing_info_path(image_path).read_text())
    return SignedImage(
        path=image_path,
        gnupghome=Path(saved["gnupghome"]),
        fingerprint=saved["fingerprint"],
        identity=saved["identity"],
        signatures=tuple(
            image_path / Path(signature).name for signature in saved["signatures"]
        ),
    )


def verify_signature(
    gnupghome: Path | str,
    manifest_path: Path | str,
    identity: str,
    fingerprint: str,
    signature_path: Path | str,
) -> bool:
    """Check one signature with skopeo standalone-verify.

    Returns False when skopeo rejects the signature itself (wrong manifest,
    identity or key) and raises ToolError for anything else, such as a
    missing file.
    """
    skopeo = require_tool("skopeo")
    gnupghome = Path(gnupghome)
    command = [
        skopeo,
        "standalone-verify",
        str(manifest_path),
        identity,
        fingerprint,
        str(signature_path),
    ]
    with gpg_agent_stopped_afterwards(gnupghome):
        try:
            run_tool(command, env=tool_env(gnupghome.parent, gnupghome))
        except ToolError as error:
            if "Error verifying signature" in error.stderr:
                return False
            raise
    return True


def read_manifest(image_path: Path | str) -> dict:
    """Return the parsed manifest.json of a dir: image."""
    return json.loads((Path(image_path) / "manifest.json").read_text())


def manifest_media_type(manifest: Mapping) -> str:
    """Return a manifest's media type, working it out when the field is absent.

    OCI manifests written by umoci and skopeo 1.9.3 carry no mediaType field,
    and schema 1 manifests never do.
    """
    if manifest.get("mediaType"):
        return manifest["mediaType"]
    if manifest.get("schemaVersion") == 1:
        return DOCKER_V2S1_SIGNED if "signatures" in manifest else DOCKER_V2S1
    if "manifests" in manifest:
        return OCI_INDEX
    return OCI_MANIFEST


def blob_files(image_path: Path | str) -> list[Path]:
    """Return the files of a dir: image named by a bare sha256 hex digest."""
    return sorted(
        entry
        for entry in Path(image_path).iterdir()
        if entry.is_file() and BLOB_NAME.fullmatch(entry.name)
    )


def _instance_platform_args(manifest: Mapping) -> list[str]:
    if "manifests" not in manifest or not manifest["manifests"]:
        return []
    platform = manifest["manifests"][0].get("platform", {})
    arguments = []
    for option, key in (
        ("--override-os", "os"),
        ("--override-arch", "architecture"),
        ("--override-variant", "variant"),
    ):
        if platform.get(key):
            arguments += [option, platform[key]]
    return arguments


def skopeo_accepts(path: Path | str, workdir: Path | str) -> None:
    """Assert that skopeo can inspect a dir: image and copy it out intact.

    The copy to an OCI layout re-reads every blob and instance manifest and
    checks their digests. Signatures are dropped from that copy because the
    OCI layout cannot store them. Raises AssertionError with skopeo's stderr.
    """
    skopeo = require_tool("skopeo")
    path = Path(path)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = tool_env(workdir)
    manifest_bytes = (path / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    is_multi_instance = "manifests" in manifest

    # On a machine of another architecture skopeo would look for an instance
    # of its own platform, so it is pointed at one the image has.
    platform_args = _instance_platform_args(manifest)
    target = Path(tempfile.mkdtemp(prefix="accepted-", dir=workdir))
    try:
        run_tool([skopeo, *platform_args, "inspect", f"dir:{path}"], env=env)
        raw = run_tool([skopeo, "inspect", "--raw", f"dir:{path}"], env=env).stdout
        run_tool(
            [
                skopeo,
                "--insecure-policy",
                "copy",
                "--quiet",
                "--remove-signatures",
                *(["--all"] if is_multi_instance else []),
                f"dir:{path}",
                f"oci:{target}:latest",
            ],
            env=env,
        )
    except ToolError as error:
        raise AssertionError(f"skopeo rejected {path}: {error}") from error
    if raw != manifest_bytes:
        raise AssertionError(f"skopeo inspect --raw of {path} differs from the file")


def copy_image(source: Path | str, destination: Path | str) -> Path:
    """Copy a dir: image, and its signing details if any, to destination."""
    source = Path(source)
    destination = Path(destination)
    shutil.copytree(source, destination)
    signing_info = _signing_info_path(source)
    if signing_info.exists():
        shutil.copyfile(signing_info, _signing_info_path(destination))
    return destination


def write_layered_image(
    destination: Path | str, layer_sizes: list[int], seed: str = "layered"
) -> Path:
    """Write a dir: image with one uncompressed tar layer per size, directly.

    Each layer holds one file of pseudo-random bytes of about that size, so big
    images cost seconds, not the minutes umoci needs to repack them. The config
    lists the layers as its diff IDs, as an uncompressed image must. Returns the
    image folder, which must not exist yet.
    """
    import io
    import tarfile

    destination = Path(destination)
    destination.mkdir(parents=True)

    def store(data: bytes) -> dict:
        hex_digest = hashlib.sha256(data).hexdigest()
        (destination / hex_digest).write_bytes(data)
        return {"digest": f"sha256:{hex_digest}", "size": len(data)}

    layer_descriptors = []
    for number, size in enumerate(layer_sizes, start=1):
        content = pseudo_random_bytes(f"{seed}/{number}", size)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            member = tarfile.TarInfo(f"data/layer-{number}.bin")
            member.size, member.mtime, member.mode = size, FIXED_MTIME, 0o644
            tar.addfile(member, io.BytesIO(content))
        media_type = "application/vnd.oci.image.layer.v1.tar"
        layer_descriptors.append({"mediaType": media_type, **store(buffer.getvalue())})
    config = {
        "created": FIXED_CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": [d["digest"] for d in layer_descriptors],
        },
    }
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **store(config_bytes),
        },
        "layers": layer_descriptors,
    }
    (destination / "manifest.json").write_bytes(json.dumps(manifest).encode())
    (destination / "version").write_text(DIR_VERSION_1_1)
    return destination


class DirImageCache(Mapping[str, Path]):
    """A mapping from kind to dir: image that builds each image on first use."""

    def __init__(self, workdir: Path | str):
        self.workdir = Path(workdir)
        self._images: dict[str, Path] = {}

    def __getitem__(self, kind: str) -> Path:
        if kind not in KINDS:
            raise KeyError(kind)
        if kind not in self._images:
            self._images[kind] = make_dir_image(self.workdir, kind)
        return self._images[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


def main(arguments: list[str]) -> int:
    """Write one kind of image to a directory that must not exist yet."""
    if len(arguments) != 2 or arguments[0] not in KINDS:
        print(f"usage: imagekit.py {{{','.join(KINDS)}}} DESTINATION", file=sys.stderr)
        return 2
    kind, destination = arguments[0], Path(arguments[1])
    with tempfile.TemporaryDirectory(prefix="imagekit-") as workdir:
        shutil.copytree(make_dir_image(workdir, kind), destination)
    print(destination)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
