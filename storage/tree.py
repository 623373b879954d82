"""Trees of images: finding the image folders under a root, and telling whether a
mirrored image is already current.

An image folder is a folder holding `manifest.json` that `image_layout_version`
counts as an image: one with a version file, or whose manifest parses as an
image manifest, so a web app or `docker save` output is never taken for one (nor
pruned). The search never descends into an image folder (blobs are files, and a
folder inside an image is not part of it) and never follows a symbolic link to a
folder, so it cannot leave the root or loop.
"""

import os
from dataclasses import dataclass

from storage import layout
from storage.digest import parse_digest
from storage.errors import ImageError, NotAnImage
from storage.plan import ImagePlan, plan_image
from storage.source import DirImageSource, image_layout_version

ROOT_IMAGE = "."


def is_image_folder(path: str) -> bool:
    """Whether `path` is a real folder (not a link to one) holding an image."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    if not os.path.lexists(layout.manifest_path(path)):
        return False
    try:
        image_layout_version(path)
    except (ImageError, OSError):
        return False
    return True


def find_images(root: str) -> list[str]:
    """The image folders under `root`, as sorted paths relative to it.

    `root` itself is reported as "." when it is an image. Folders that cannot be
    read are skipped; a missing `root` holds no images.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        if os.path.lexists(root):
            raise NotAnImage(f"{root} is not a folder")
        return []
    if is_image_folder(root):
        return [ROOT_IMAGE]

    found: list[str] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                subfolders = [
                    entry.path
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False)
                ]
        except (PermissionError, FileNotFoundError):
            continue
        for subfolder in subfolders:
            if is_image_folder(subfolder):
                found.append(os.path.relpath(subfolder, root))
            else:
                pending.append(subfolder)
    return sorted(found)


@dataclass(frozen=True)
class MirrorPlan:
    """What syncing one image of a tree involves.

    `current` is true when the destination already holds this very image: the
    same top-level manifest bytes, the same instance manifests and signatures, and
    every blob present with the recorded size. Blobs are not hashed for this; use
    verify for that.
    """

    relative: str
    source: str
    destination: str
    plan: ImagePlan
    current: bool


def plan_mirror(source: str, destination: str, relative: str = "") -> MirrorPlan:
    """Plan the copy of image `source` to `destination` and check if it is needed."""
    plan = plan_image(source)
    return MirrorPlan(
        relative=relative,
        source=os.path.abspath(source),
        destination=os.path.abspath(destination),
        plan=plan,
        current=holds_image(destination, plan),
    )


def holds_image(destination: str, plan: ImagePlan) -> bool:
    """Whether `destination` already holds the image `plan` describes.

    Cheap by design: it compares manifests and signatures byte for byte, and
    blobs only by presence and size.
    """
    try:
        target = DirImageSource(destination)
        if target.layout_version != plan.layout_version:
            return False
        if target.get_manifest() != plan.manifest:
            return False
        source = DirImageSource(plan.source)
        if target.get_signatures() != source.get_signatures(plan.signature_instance):
            return False
        for instance in plan.instances:
            if target.get_manifest(instance.digest) != instance.data:
                return False
            if target.get_signatures(instance.digest) != source.get_signatures(
                instance.digest
            ):
                return False
        for blob in plan.blobs:
            if not _blob_present(target, blob.digest, blob.size, blob.optional):
                return False
    except (ImageError, OSError):
        return False
    return True


def _blob_present(target: DirImageSource, digest: str, size, optional: bool) -> bool:
    path = layout.blob_path(target.path, parse_digest(digest))
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return optional
    return size is None or info.st_size == size
