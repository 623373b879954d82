"""Digests: valid ones round-trip, every malformed one is refused before any path."""

import hashlib

import pytest

from storage import Digest, InvalidDigest, digest_of, parse_digest

SHA256_HEX = hashlib.sha256(b"hello").hexdigest()
SHA512_HEX = hashlib.sha512(b"hello").hexdigest()

HOSTILE_DIGESTS = [
    "sha256:../x",
    "sha256:../../etc/passwd",
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + SHA256_HEX.upper(),
    "sha256:" + SHA256_HEX[:-1] + "A",
    "sha512:" + SHA512_HEX[:-1],
    "sha512:" + SHA256_HEX,
    "md5:" + hashlib.md5(b"hello").hexdigest(),
    "sha1:" + hashlib.sha1(b"hello").hexdigest(),
    "SHA256:" + SHA256_HEX,
    "sha256/..",
    "sha256/" + SHA256_HEX,
    "",
    ":",
    "sha256:",
    SHA256_HEX,
    "sha256:" + SHA256_HEX[:-1] + "\0",
    "sha256:" + SHA256_HEX + "\0",
    "sha256\0:" + SHA256_HEX,
    "sha256:" + SHA256_HEX[:-1] + "\u0661",
    "sha256:" + "\uff10" * 64,
    "sha256:" + SHA256_HEX[:-1] + "g",
    " sha256:" + SHA256_HEX,
    "sha256:" + SHA256_HEX + "\n",
    "sha256: " + SHA256_HEX[1:],
    "sha256:" + SHA256_HEX[:32] + " " + SHA256_HEX[33:],
    "sha256::" + SHA256_HEX[1:],
    "sha256:" + SHA256_HEX + ":",
]


def test_parse_digest_round_trips_sha256():
    """A sha256 digest parses into its parts and prints back unchanged."""
    text = f"sha256:{SHA256_HEX}"
    digest = parse_digest(text)
    assert digest == Digest("sha256", SHA256_HEX)
    assert str(digest) == text
    assert digest.short == SHA256_HEX[:12]


def test_parse_digest_round_trips_sha512():
    """A sha512 digest parses into its parts and prints back unchanged."""
    text = f"sha512:{SHA512_HEX}"
    digest = parse_digest(text)
    assert digest == Digest("sha512", SHA512_HEX)
    assert str(digest) == text


def test_parse_digest_returns_a_digest_unchanged():
    """An already parsed digest passes through as it is."""
    digest = parse_digest(f"sha256:{SHA256_HEX}")
    assert parse_digest(digest) is digest


@pytest.mark.parametrize("value", HOSTILE_DIGESTS, ids=repr)
def test_parse_digest_refuses_hostile_strings(value):
    """Every malformed digest string raises InvalidDigest naming it."""
    with pytest.raises(InvalidDigest) as caught:
        parse_digest(value)
    if value:
        assert repr(value) in str(caught.value)


@pytest.mark.parametrize(
    "value", [None, 256, b"sha256:" + SHA256_HEX.encode(), ["sha256", SHA256_HEX]]
)
def test_parse_digest_refuses_non_strings(value):
    """A value that is not a string raises InvalidDigest naming its type."""
    with pytest.raises(InvalidDigest, match=type(value).__name__):
        parse_digest(value)


def test_invalid_digest_is_a_value_error():
    """Callers that only know the builtins catch InvalidDigest as ValueError."""
    with pytest.raises(ValueError):
        parse_digest("sha256:../x")


def test_digest_hasher_matches_its_algorithm():
    """A digest's hasher hashes with the digest's own algorithm."""
    for text in (f"sha256:{SHA256_HEX}", f"sha512:{SHA512_HEX}"):
        digest = parse_digest(text)
        hasher = digest.hasher()
        hasher.update(b"hello")
        assert hasher.hexdigest() == digest.hex


def test_digest_of_computes_both_algorithms():
    """digest_of gives the sha256 by default and sha512 on request."""
    assert digest_of(b"hello") == Digest("sha256", SHA256_HEX)
    assert digest_of(b"hello", "sha512") == Digest("sha512", SHA512_HEX)


def test_digest_of_refuses_unknown_algorithms():
    """digest_of refuses algorithms the layout does not accept."""
    with pytest.raises(InvalidDigest, match="md5"):
        digest_of(b"hello", "md5")


@pytest.mark.parametrize(
    "parts",
    [
        ("sha256", "../x"),
        ("sha256", "../" + "a" * 61),
        ("sha256", SHA256_HEX.upper()),
        ("md5", hashlib.md5(b"hello").hexdigest()),
        ("sha256/..", SHA256_HEX),
        ("", ""),
        (5, None),
    ],
    ids=repr,
)
def test_digest_built_by_hand_is_validated(parts):
    """Building a Digest directly checks its parts as parse_digest does."""
    with pytest.raises(InvalidDigest):
        Digest(*parts)


@pytest.mark.parametrize(
    "parts", [("sha256", "../x"), ("sha512", "/" + "a" * 127), (None, SHA256_HEX)]
)
def test_parse_digest_checks_a_digest_built_around_its_constructor(parts):
    """A Digest made without its constructor (`_make`) is checked again."""
    with pytest.raises(InvalidDigest):
        parse_digest(Digest._make(parts))


def test_a_valid_digest_survives_pickling():
    """Task arguments are pickled; a digest comes back equal and still checked."""
    import pickle

    digest = parse_digest(f"sha512:{SHA512_HEX}")
    assert pickle.loads(pickle.dumps(digest)) == digest
