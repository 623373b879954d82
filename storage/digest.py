"""Content digests: parsing, validation and hashing.

A digest is `algorithm:hex`. Only sha256 and sha512 are accepted, with lower-case
hex of exactly the length the algorithm produces. Validation happens here, before
a digest is ever used to build a path, so `sha256:../x` can never name a file: a
`Digest` checks its parts when it is built, and `parse_digest` checks them again
for one made some other way (`_make`, `_replace`, `tuple.__new__`).
"""

import hashlib
from typing import NamedTuple

from storage.errors import InvalidDigest

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX_CHARACTERS = frozenset("0123456789abcdef")


def _check_parts(algorithm, hex_part, text: str) -> None:
    """Raise `InvalidDigest`, naming `text`, unless the parts make a digest."""
    if not isinstance(algorithm, str) or not isinstance(hex_part, str):
        raise InvalidDigest(
            f"digest parts must be strings, found {type(algorithm).__name__} "
            f"and {type(hex_part).__name__}"
        )
    if algorithm not in HEX_LENGTHS:
        known = ", ".join(sorted(HEX_LENGTHS))
        raise InvalidDigest(
            f"digest {text!r} uses algorithm {algorithm!r}; expected one of {known}"
        )
    expected_length = HEX_LENGTHS[algorithm]
    if len(hex_part) != expected_length:
        raise InvalidDigest(
            f"digest {text!r} has {len(hex_part)} hex characters; "
            f"{algorithm} needs {expected_length}"
        )
    if not _HEX_CHARACTERS.issuperset(hex_part):
        raise InvalidDigest(f"digest {text!r} is not lower-case hexadecimal")


class _DigestParts(NamedTuple):
    algorithm: str
    hex: str


class Digest(_DigestParts):
    """A validated digest: building one with invalid parts raises `InvalidDigest`."""

    __slots__ = ()

    def __new__(cls, algorithm: str, hex: str) -> "Digest":
        _check_parts(algorithm, hex, f"{algorithm}:{hex}")
        return super().__new__(cls, algorithm, hex)

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
    """Parse and validate `value`, raising `InvalidDigest` if it is not a digest.

    A `Digest` is checked again and returned as it is.
    """
    if isinstance(value, Digest):
        parts = tuple(value)
        if len(parts) != 2:
            raise InvalidDigest(f"digest {parts!r} does not have two parts")
        _check_parts(*parts, f"{parts[0]}:{parts[1]}")
        return value
    if not isinstance(value, str):
        raise InvalidDigest(f"digest must be a string, found {type(value).__name__}")

    algorithm, separator, hex_part = value.partition(":")
    if not separator:
        raise InvalidDigest(f"digest {value!r} has no 'algorithm:' prefix")
    _check_parts(algorithm, hex_part, value)
    return Digest(algorithm, hex_part)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of `data` with `algorithm`."""
    if algorithm not in HEX_LENGTHS:
        raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
