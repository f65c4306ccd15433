"""Ed25519 keys and the signed statements of the audit trail: checkpoints and key rotations.

A hash chain shows that lines link up, not who wrote them: anyone who can edit the file can
re-chain it. With `audit.signing_key` the writer signs, every `checkpoint_seconds` and at
shutdown, a statement of the chain's head (its `seq` and `hash`) and sends it to every anchor, so
that `countersign audit verify --public-key` can tell the history the writer signed from one an
administrator rewrote.

Statements are JSON objects; what is signed is `canonical(statement without "sig")` as UTF-8
(see `chain.canonical`), and `sig` is the Ed25519 signature in base64url without padding. Every
statement names its `type`, so a signature over one kind of statement never verifies as another:

- checkpoint (`type: "countersign.checkpoint"`): `v`, `chain` (the chain's id, kept across
  restarts and rotation), `seq` and `hash` (the head: the last line before the checkpoint line),
  `ts` (ISO 8601 UTC), `key_id`, and `prev_checkpoint` (the `seq` of the chain's previous
  checkpoint line, 0 for the first), so that a checkpoint removed from the middle of a file is
  noticed even when the file was re-chained around it;
- key rotation (`type: "countersign.key_rotation"`): `v`, `chain`, `seq`, `hash`, `ts`,
  `key_id` (the new key), `previous_key_id`, `public_key` (the new key, raw, base64url), signed by
  the new key.

The key id is the first 16 hex digits of the SHA-256 of the raw 32-byte public key.

Pure functions and small values: no I/O but reading PEM files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .chain import canonical

CHECKPOINT_EVENT: Final = "audit.checkpoint"
KEY_ROTATED_EVENT: Final = "audit.key_rotated"
TAIL_SET_ASIDE_EVENT: Final = "audit.tail_set_aside"

CHECKPOINT_TYPE: Final = "countersign.checkpoint"
ROTATION_TYPE: Final = "countersign.key_rotation"
STATEMENT_VERSION: Final = 1

_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL)


class SigningKeyError(ValueError):
    """A key file that cannot be used (missing, unreadable, not an Ed25519 key)."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Base64url without padding; ValueError on anything else."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def signed_bytes(statement: Mapping[str, Any]) -> bytes:
    """The bytes a statement's signature covers: its canonical JSON without `sig`."""
    return canonical({k: v for k, v in statement.items() if k != "sig"}).encode("utf-8")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The writer's private key, with its public half and key id."""

    private: Ed25519PrivateKey
    key_id: str

    @classmethod
    def of(cls, private: Ed25519PrivateKey) -> SigningKey:
        return cls(private, key_id_of(private.public_key()))

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def sign(self, data: bytes) -> str:
        """Ed25519 over `data`, base64url. About 40 µs: fine on the loop, a few times a minute."""
        return b64url(self.private.sign(data))

    def sign_statement(self, statement: dict[str, Any]) -> dict[str, Any]:
        """`statement` with its `sig` (and `key_id`, if it had none) filled in."""
        statement.setdefault("key_id", self.key_id)
        statement["sig"] = self.sign(signed_bytes(statement))
        return statement

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_signing_key() -> SigningKey:
    return SigningKey.of(Ed25519PrivateKey.generate())


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The Ed25519 private key in the PEM file at `path` (SigningKeyError if anything else)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SigningKeyError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{os.fspath(path)} is not an unencrypted PEM private key ({exc}); "
            "create one with: countersign keys new --audit"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{os.fspath(path)} holds a {type(key).__name__}, not an Ed25519 key")
    return SigningKey.of(key)


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id, from PEM files (each may hold several keys; a private key's public
    half is taken too). SigningKeyError names the file that cannot be used."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SigningKeyError(f"cannot read {name}: {exc.strerror or exc}") from None
        blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data)]
        if not blocks:
            raise SigningKeyError(f"{name}: no PEM key in it")
        for block in blocks:
            public = _public_of(block, name)
            keys[key_id_of(public)] = public
    return keys


def _public_of(block: bytes, name: str) -> Ed25519PublicKey:
    try:
        if b"PRIVATE KEY" in block.split(b"\n", 1)[0]:
            private = serialization.load_pem_private_key(block, password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise SigningKeyError(f"{name}: a {type(private).__name__}, not an Ed25519 key")
            return private.public_key()
        public = serialization.load_pem_public_key(block)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{name}: not a PEM key ({exc})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SigningKeyError(f"{name}: a {type(public).__name__}, not an Ed25519 key")
    return public


def verify_statement(
    statement: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]
) -> str | None:
    """None if `statement` is signed by one of `keys` (by its `key_id`), else why not."""
    key_id = statement.get("key_id")
    sig = statement.get("sig")
    if not isinstance(key_id, str) or not isinstance(sig, str):
        return "no key_id or sig"
    key = keys.get(key_id)
    if key is None:
        return f"signed by key {key_id}, which is not among the public keys given"
    try:
        key.verify(b64url_decode(sig), signed_bytes(statement))
    except (ValueError, InvalidSignature):
        return f"signature does not verify with key {key_id}"
    return None


def checkpoint_statement(
    *, chain: str, seq: int, head_hash: str, ts: str, prev_checkpoint: int
) -> dict[str, Any]:
    """An unsigned checkpoint of the head (`seq`, `head_hash`) of `chain` (sign it next)."""
    return {
        "type": CHECKPOINT_TYPE,
        "v": STATEMENT_VERSION,
        "chain": chain,
        "seq": seq,
        "hash": head_hash,
        "ts": ts,
        "prev_checkpoint": prev_checkpoint,
    }


def rotation_statement(
    key: SigningKey, *, chain: str, seq: int, head_hash: str, ts: str, previous_key_id: str
) -> dict[str, Any]:
    """A signed statement that `key` follows `previous_key_id` from the head (`seq`, hash)."""
    return key.sign_statement(
        {
            "type": ROTATION_TYPE,
            "v": STATEMENT_VERSION,
            "chain": chain,
            "seq": seq,
            "hash": head_hash,
            "ts": ts,
            "key_id": key.key_id,
            "previous_key_id": previous_key_id,
            "public_key": b64url(raw_public(key.public)),
        }
    )
