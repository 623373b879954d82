"""Manifests: what kind each one is, which blobs it needs, which instances it lists.

The dir: layout stores no media type, so the kind of a manifest comes from its JSON:
its `mediaType`, or `schemaVersion` 1 with `fsLayers` for Docker schema 1, or the
presence of `config` or `manifests` for OCI documents that omit `mediaType`.
"""

import base64
import binascii
import json
from dataclasses import dataclass, field

from storage.digest import Digest, digest_of, parse_digest
from storage.errors import InvalidDigest, InvalidManifest

DOCKER_V2_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V2_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V2_SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

SINGLE_IMAGE_TYPES = (
    DOCKER_V2_SCHEMA1,
    DOCKER_V2_SCHEMA1_SIGNED,
    DOCKER_V2_SCHEMA2,
    OCI_MANIFEST,
)
LIST_TYPES = (DOCKER_MANIFEST_LIST, OCI_INDEX)


@dataclass(frozen=True)
class BlobRef:
    """A blob an image needs. `size` is None where the manifest does not say.

    `optional` marks non-distributable layers (those with `urls`), which registries
    and skopeo leave out of copies; they are copied when present.
    """

    digest: str
    size: int | None = None
    media_type: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """Parse `os/arch[/variant]`, as given on a command line."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not of the form os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, wanted: "Platform") -> bool:
        """Whether this platform satisfies `wanted`; no variant asked means any."""
        return (
            self.os == wanted.os
            and self.architecture == wanted.architecture
            and (wanted.variant is None or self.variant == wanted.variant)
        )


@dataclass(frozen=True)
class Instance:
    """One entry of a manifest list or image index."""

    digest: str
    size: int | None
    media_type: str | None
    platform: Platform | None


@dataclass(frozen=True)
class Manifest:
    """What a manifest says, as far as copying and checking need it."""

    media_type: str
    digest: str
    blobs: tuple[BlobRef, ...] = ()
    instances: tuple[Instance, ...] = field(default=())

    @property
    def is_list(self) -> bool:
        return self.media_type in LIST_TYPES


def _fail(what: str) -> InvalidManifest:
    return InvalidManifest(f"manifest: {what}")


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(f"{where} must be a JSON object, found {type(value).__name__}")
    return value


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{where} must be a string, found {type(value).__name__}")
    return value


def _descriptor_digest(descriptor: dict, where: str) -> str:
    raw = _string(descriptor.get("digest"), f"{where}.digest")
    try:
        return str(parse_digest(raw))
    except InvalidDigest as error:
        raise _fail(f"{where}: {error}") from None


def _descriptor_size(descriptor: dict, where: str) -> int | None:
    size = descriptor.get("size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _fail(f"{where}.size must be a non-negative integer, found {size!r}")
    return size


def _descriptor(value, where: str) -> BlobRef:
    descriptor = _object(value, where)
    media_type = descriptor.get("mediaType")
    if media_type is not None:
        _string(media_type, f"{where}.mediaType")
    urls = descriptor.get("urls")
    return BlobRef(
        digest=_descriptor_digest(descriptor, where),
        size=_descriptor_size(descriptor, where),
        media_type=media_type,
        optional=bool(urls),
    )


def _unique(blobs) -> tuple[BlobRef, ...]:
    """Blobs in first-seen order, each digest once (schema 1 repeats empty layers)."""
    seen: dict[str, BlobRef] = {}
    for blob in blobs:
        seen.setdefault(blob.digest, blob)
    return tuple(seen.values())


def _list_of(document: dict, key: str, where: str) -> list:
    value = document.get(key)
    if not isinstance(value, list):
        found = "nothing" if value is None else type(value).__name__
        raise _fail(f"{where}{key} must be a list, found {found}")
    return value


def schema1_payload(data: bytes, document: dict) -> bytes:
    """The bytes a signed schema 1 manifest's digest covers: the JWS payload.

    A signed schema 1 manifest embeds its signatures; its digest is computed over
    the document with them cut out, as the `protected` header describes.
    """
    signatures = document.get("signatures")
    if not signatures:
        return data
    try:
        protected = _object(signatures[0], "signatures[0]")["protected"]
        padded = protected + "=" * (-len(protected) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded))
        format_length = header["formatLength"]
        padded_tail = header["formatTail"] + "=" * (-len(header["formatTail"]) % 4)
        format_tail = base64.urlsafe_b64decode(padded_tail)
    except (KeyError, TypeError, ValueError, RecursionError, binascii.Error) as error:
        raise _fail(
            f"signed schema 1 manifest has a bad protected header: {error}"
        ) from None
    if not isinstance(format_length, int) or not 0 <= format_length <= len(data):
        raise _fail(f"signed schema 1 formatLength {format_length!r} is out of range")
    return data[:format_length] + format_tail


def manifest_digest(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest that names manifest `data`, as registries and skopeo compute it."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return digest_of(data, algorithm)
    if isinstance(document, dict) and document.get("schemaVersion") == 1:
        return digest_of(schema1_payload(data, document), algorithm)
    return digest_of(data, algorithm)


def _parse_schema1(data: bytes, document: dict) -> Manifest:
    layers = _list_of(document, "fsLayers", "schema 1 ")
    blobs = []
    for position, layer in enumerate(layers):
        where = f"fsLayers[{position}]"
        layer = _object(layer, where)
        raw = _string(layer.get("blobSum"), f"{where}.blobSum")
        try:
            blobs.append(BlobRef(digest=str(parse_digest(raw))))
        except InvalidDigest as error:
            raise _fail(f"{where}: {error}") from None
    signed = bool(document.get("signatures"))
    media_type = DOCKER_V2_SCHEMA1_SIGNED if signed else DOCKER_V2_SCHEMA1
    digest = digest_of(schema1_payload(data, document))
    return Manifest(media_type, str(digest), _unique(blobs))


def _parse_image(data: bytes, document: dict, media_type: str) -> Manifest:
    config = _descriptor(document.get("config"), "config")
    layers = _list_of(document, "layers", "")
    blobs = [config]
    blobs += [_descriptor(layer, f"layers[{n}]") for n, layer in enumerate(layers)]
    return Manifest(media_type, str(digest_of(data)), _unique(blobs))


def _platform(value, where: str) -> Platform | None:
    if value is None:
        return None
    platform = _object(value, where)
    variant = platform.get("variant")
    return Platform(
        os=_string(platform.get("os"), f"{where}.os"),
        architecture=_string(platform.get("architecture"), f"{where}.architecture"),
        variant=_string(variant, f"{where}.variant") if variant is not None else None,
    )


def _parse_list(data: bytes, document: dict, media_type: str) -> Manifest:
    entries = _list_of(document, "manifests", "")
    instances = []
    for position, entry in enumerate(entries):
        where = f"manifests[{position}]"
        blob = _descriptor(entry, where)
        instances.append(
            Instance(
                digest=blob.digest,
                size=blob.size,
                media_type=blob.media_type,
                platform=_platform(entry.get("platform"), f"{where}.platform"),
            )
        )
    return Manifest(media_type, str(digest_of(data)), (), tuple(instances))


def parse_manifest(data: bytes) -> Manifest:
    """Parse manifest `data`, raising `InvalidManifest` with what was wrong."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        # json raises RecursionError for deeply nested arrays: hostile, not a crash.
        raise _fail(f"not valid JSON: {error}") from None
    document = _object(document, "the document")

    schema_version = document.get("schemaVersion")
    # True == 1 and 2.0 == 2 in Python; containers/image reads an integer and
    # refuses both, so compare the type first.
    if type(schema_version) is not int or schema_version not in (1, 2):
        raise _fail(f"schemaVersion must be 1 or 2, found {schema_version!r}")
    if schema_version == 1:
        return _parse_schema1(data, document)

    media_type = document.get("mediaType")
    if media_type is None:
        # OCI allows documents without mediaType; tell them apart by their keys.
        if "manifests" in document:
            media_type = OCI_INDEX
        elif "config" in document:
            media_type = OCI_MANIFEST
        else:
            raise _fail("no mediaType, and neither config nor manifests")
    media_type = _string(media_type, "mediaType")

    if media_type in (DOCKER_V2_SCHEMA2, OCI_MANIFEST):
        return _parse_image(data, document, media_type)
    if media_type in LIST_TYPES:
        return _parse_list(data, document, media_type)
    raise _fail(f"unknown mediaType {media_type!r}")
