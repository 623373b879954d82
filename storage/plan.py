"""What an image consists of: its manifests, its unique blobs, its signatures.

`plan_image` reads the manifests of a source folder and answers what a copy must
write; `check_image` and `verify_blob` answer whether a folder holds all of it,
intact; `describe_image` summarises an image for people.
"""

import json
import os
from dataclasses import dataclass, field

from storage import layout
from storage.digest import Digest, parse_digest
from storage.errors import (
    BlobNotFound,
    DigestMismatch,
    ImageError,
    InvalidManifest,
    NotAnImage,
)
from storage.files import hash_stream
from storage.manifest import (
    BlobRef,
    Manifest,
    Platform,
    manifest_digest,
    parse_manifest,
)
from storage.source import DirImageSource

# Lists of lists are legal but rare; a deeper chain is a loop or an attack.
MAX_LIST_DEPTH = 4
CONFIG_SIZE_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class InstanceManifest:
    """A manifest stored as `<hex>.manifest.json`, with the bytes to write."""

    digest: str
    data: bytes
    media_type: str
    platform: str | None


@dataclass(frozen=True)
class ImagePlan:
    """Everything a copy of one image writes, as plain picklable values.

    `signature_instance` is the instance whose signatures become the copy's
    top-level signatures: None for the image's own, or the chosen instance's
    digest when one platform is copied out of a list.
    """

    source: str
    manifest: bytes
    media_type: str
    manifest_digest: str
    blobs: tuple[BlobRef, ...]
    instances: tuple[InstanceManifest, ...] = ()
    signature_instance: str | None = None
    layout_version: str = layout.VERSION_1_1
    problems: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(blob.size or 0 for blob in self.blobs)

    @property
    def digests(self) -> set[str]:
        """Digests of every file the image consists of, apart from top-level ones."""
        return {blob.digest for blob in self.blobs} | {
            instance.digest for instance in self.instances
        }


def _digest_matches(data: bytes, digest: Digest) -> bool:
    return manifest_digest(data, digest.algorithm) == digest


def _single_image_platform(source: DirImageSource, manifest: Manifest, data: bytes):
    """The os/architecture a single-image manifest declares, if it can be told.

    A platform field that is missing or not a string tells nothing: the image is
    then one whose platform cannot be told, as one without a config would be.
    """
    document = json.loads(data)
    if document.get("schemaVersion") == 1:
        return _platform_of(
            {"os": "linux", "architecture": document.get("architecture")}
        )
    config = manifest.blobs[0]
    file, _ = source.get_blob(config.digest)
    with file:
        config_data = file.read(CONFIG_SIZE_LIMIT)
    try:
        config_document = json.loads(config_data)
    except (ValueError, RecursionError):
        return None
    return _platform_of(config_document)


def _platform_of(document) -> Platform | None:
    if not isinstance(document, dict):
        return None
    os_name, architecture = document.get("os"), document.get("architecture")
    variant = document.get("variant")
    if not (isinstance(os_name, str) and os_name):
        return None
    if not (isinstance(architecture, str) and architecture):
        return None
    if variant is not None and not isinstance(variant, str):
        return None
    return Platform(os_name, architecture, variant or None)


def _merge_blobs(groups) -> tuple[BlobRef, ...]:
    merged: dict[str, BlobRef] = {}
    for blobs in groups:
        for blob in blobs:
            merged.setdefault(blob.digest, blob)
    return tuple(merged.values())


def plan_image(
    source: DirImageSource | str,
    platform: str | None = None,
    strict: bool = True,
) -> ImagePlan:
    """Read the manifests of `source` and list what a copy of it writes.

    With `platform` (`os/arch[/variant]`) and a list or index, only the matching
    instance is planned, as a single image. With `strict` false, missing or
    corrupt instance manifests are recorded in `problems` instead of raised.
    """
    if isinstance(source, str):
        source = DirImageSource(source)
    data = source.get_manifest()
    try:
        manifest = parse_manifest(data)
    except InvalidManifest as error:
        raise InvalidManifest(f"{layout.manifest_path(source.path)}: {error}") from None
    wanted = Platform.parse(platform) if platform else None

    if not manifest.is_list:
        if wanted is not None:
            found = _single_image_platform(source, manifest, data)
            if found is not None and not found.matches(wanted):
                raise NotAnImage(
                    f"{source.path} holds a single {found} image, not {wanted}"
                )
        return ImagePlan(
            source=source.path,
            manifest=data,
            media_type=manifest.media_type,
            manifest_digest=manifest.digest,
            blobs=manifest.blobs,
            layout_version=layout.layout_version_for(b.digest for b in manifest.blobs),
        )

    if wanted is not None:
        return _plan_one_instance(source, manifest, wanted)

    problems: list[str] = []
    instances: list[InstanceManifest] = []
    blob_groups = []
    _collect_instances(source, manifest, 1, instances, blob_groups, problems, strict)
    blobs = _merge_blobs(blob_groups)
    all_digests = [b.digest for b in blobs] + [i.digest for i in instances]
    return ImagePlan(
        source=source.path,
        manifest=data,
        media_type=manifest.media_type,
        manifest_digest=manifest.digest,
        blobs=blobs,
        instances=tuple(instances),
        layout_version=layout.layout_version_for(all_digests),
        problems=tuple(problems),
    )


def _read_instance(source: DirImageSource, digest: str) -> tuple[bytes, Manifest]:
    data = source.get_manifest(digest)
    if not _digest_matches(data, parse_digest(digest)):
        path = layout.manifest_path(source.path, parse_digest(digest))
        raise DigestMismatch(f"manifest of instance {digest} ({path}) is corrupt")
    try:
        return data, parse_manifest(data)
    except InvalidManifest as error:
        raise InvalidManifest(f"instance {digest}: {error}") from None


def _collect_instances(
    source, manifest, depth, instances, blob_groups, problems, strict
):
    if depth > MAX_LIST_DEPTH:
        raise InvalidManifest(f"{source.path}: lists nest deeper than {MAX_LIST_DEPTH}")
    seen = {instance.digest for instance in instances}
    for entry in manifest.instances:
        if entry.digest in seen:
            continue
        try:
            data, instance = _read_instance(source, entry.digest)
        except ImageError as error:
            # Missing, corrupt, invalid, over the cap, or leading outside the
            # folder: a check lists each of them and goes on.
            if strict:
                raise
            problems.append(str(error))
            continue
        platform = str(entry.platform) if entry.platform else None
        instances.append(
            InstanceManifest(entry.digest, data, instance.media_type, platform)
        )
        seen.add(entry.digest)
        if instance.is_list:
            _collect_instances(
                source, instance, depth + 1, instances, blob_groups, problems, strict
            )
        else:
            blob_groups.append(instance.blobs)


def _plan_one_instance(source, manifest: Manifest, wanted: Platform) -> ImagePlan:
    choices = [
        entry
        for entry in manifest.instances
        if entry.platform and entry.platform.matches(wanted)
    ]
    if not choices:
        offered = ", ".join(str(e.platform) for e in manifest.instances if e.platform)
        raise NotAnImage(
            f"{source.path} has no instance for platform {wanted}; "
            f"it offers {offered or 'no platforms'}"
        )
    chosen = choices[0]
    data, instance = _read_instance(source, chosen.digest)
    if instance.is_list:
        raise InvalidManifest(
            f"{source.path}: instance {chosen.digest} for {wanted} is itself a list"
        )
    return ImagePlan(
        source=source.path,
        manifest=data,
        media_type=instance.media_type,
        manifest_digest=chosen.digest,
        blobs=instance.blobs,
        signature_instance=chosen.digest,
        layout_version=layout.layout_version_for(b.digest for b in instance.blobs),
    )


def verify_blob(root: str, digest: str, size: int | None, optional=False) -> str | None:
    """Check one blob of the image in `root`; returns what is wrong, or None.

    Missing optional (non-distributable) blobs are not a problem.
    """
    try:
        source = DirImageSource(root)
        file, _ = source.get_blob(digest)
        with file:
            hash_stream(file, parse_digest(digest), size, name=f" ({file.name})")
    except BlobNotFound as error:
        return None if optional else str(error)
    except ImageError as error:
        return str(error)
    return None


def check_image(path: str) -> list[str]:
    """Everything missing or corrupt in the image at `path`, one sentence each.

    An empty list means every manifest and blob is present and intact.
    """
    plan = plan_image(path, strict=False)
    problems = list(plan.problems)
    for blob in plan.blobs:
        problem = verify_blob(path, blob.digest, blob.size, blob.optional)
        if problem:
            problems.append(problem)
    return problems


def describe_image(path: str) -> dict:
    """A summary of the image at `path` for `dirimage inspect`, as plain JSON."""
    source = DirImageSource(path)
    plan = plan_image(source, strict=False)
    blobs = []
    for blob in plan.blobs:
        try:
            present = os.path.getsize(source.blob_path(blob.digest))
        except (BlobNotFound, OSError):
            present = None
        blobs.append(
            {
                "digest": blob.digest,
                "size": blob.size if blob.size is not None else present,
                "media_type": blob.media_type,
                "present": present is not None,
            }
        )
    return {
        "path": source.path,
        "layout_version": source.layout_version,
        "manifest_digest": plan.manifest_digest,
        "media_type": plan.media_type,
        "blobs": blobs,
        "total_size": sum(b["size"] or 0 for b in blobs),
        "instances": [
            {"digest": i.digest, "media_type": i.media_type, "platform": i.platform}
            for i in plan.instances
        ],
        "signatures": len(source.get_signatures()),
        "problems": list(plan.problems),
    }
