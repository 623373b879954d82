"""Content digests: parsing, validation and hashing.

A digest is `algorithm:hex`. Only sha256 and sha512 are accepted, with lower-case
hex of exactly the length the algorithm produces. Validation happens here, before
a digest is ever used to build a path, so `sha256:../x` can never name a file.
"""

import hashlib
from typing import NamedTuple

from storage.errors import InvalidDigest

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX_CHARACTERS = frozenset("0123456789abcdef")


class Digest(NamedTuple):
    """A validated digest. Build one with `parse_digest`, not directly."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """The first twelve hex characters, for log lines and run names."""
        return self.hex[:12]

    def hasher(self):
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)


def parse_digest(value: "str | Digest") -> Digest:
    """Parse and validate `value`, raising `InvalidDigest` if it is not a digest."""
    if isinstance(value, Digest):
        return value
    if not isinstance(value, str):
        raise InvalidDigest(f"digest must be a string, found {type(value).__name__}")

    algorithm, separator, hex_part = value.partition(":")
    if not separator:
        raise InvalidDigest(f"digest {value!r} has no 'algorithm:' prefix")
    if algorithm not in HEX_LENGTHS:
        known = ", ".join(sorted(HEX_LENGTHS))
        raise InvalidDigest(
            f"digest {value!r} uses algorithm {algorithm!r}; expected one of {known}"
        )
    expected_length = HEX_LENGTHS[algorithm]
    if len(hex_part) != expected_length:
        raise InvalidDigest(
            f"digest {value!r} has {len(hex_part)} hex characters; "
            f"{algorithm} needs {expected_length}"
        )
    if not _HEX_CHARACTERS.issuperset(hex_part):
        raise InvalidDigest(f"digest {value!r} is not lower-case hexadecimal")
    return Digest(algorithm, hex_part)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of `data` with `algorithm`."""
    if algorithm not in HEX_LENGTHS:
        raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
