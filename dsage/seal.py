"""Private results: sealed by the monitor to the submitting client's public key.

A CurveZMQ key is a Curve25519 key, so PyNaCl's ``SealedBox`` can encrypt to
it directly: only the holder of the client's secret key can open the result,
not the broker's database nor any other subscriber.
"""

from __future__ import annotations

import zmq
from nacl.public import PrivateKey, PublicKey, SealedBox

from .keys import Keypair


def seal(owner_z85: str, data: bytes) -> bytes:
    """Encrypt ``data`` to the owner's public key (z85)."""
    return SealedBox(PublicKey(zmq.z85_decode(owner_z85))).encrypt(data)


def open_sealed(keys: Keypair, data: bytes) -> bytes:
    """Decrypt data sealed to ``keys``; raises nacl.exceptions.CryptoError if tampered."""
    return SealedBox(PrivateKey(zmq.z85_decode(keys.secret))).decrypt(data)
