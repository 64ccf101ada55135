"""Private results: encrypted by the monitor to the submitting client's public key.

A CurveZMQ key is a Curve25519 key, so NaCl boxes can encrypt to it directly:
only the holder of the client's secret key can open a result, not the
broker's database nor any other subscriber.

The construction is a NaCl ``Box`` (X25519 + XSalsa20-Poly1305) between the
monitor's keypair and the owner's public key, with a fresh random nonce per
blob. A sealed blob is self-contained::

    b"\\x02" + sender public key (32 bytes) + nonce (24) + ciphertext with MAC (16 + n)

and the plaintext binds the blob to its job: a 2-byte length, the binding (the
job id, the owner, the final status, the encoding, where the result came from,
and which part this is), then the data. The opener rebuilds the binding from
the record it was given and compares, and checks that the sender key is the
worker's the record names, so a result cannot be moved to another job, given
another status or encoding, or claimed by another worker, even by someone who
can edit the broker's store.

A job's result is always sealed, even when empty. Its output is sealed when
the job printed something (part ``output``, the result's part ``result``);
when it printed nothing there is no output blob at all, and the result's part
is :data:`RESULT_ALONE`, so an output cannot be blanked unnoticed either.

Why not ``SealedBox``: it makes a fresh ephemeral keypair for every blob, so
each job costs two X25519 scalar multiplications to seal and two to open
(about 0.4 ms in all on a 2-core machine, as much as a whole round trip).
A ``Box`` does the scalar multiplication once per (monitor, owner) pair; the
precomputed shared key is cached, and each blob then costs a few
microseconds. Anonymous monitors use a fresh keypair per process, so this
holds for them too.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

from nacl.bindings import crypto_box_easy_afternm, crypto_box_open_easy_afternm
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from zmq.utils import z85

from .entropy import RandomPool
from .keys import Keypair

VERSION = b"\x02"
_KEY_LEN = 32
_HEADER = len(VERSION) + _KEY_LEN
#: at most how many bytes sealing adds to a blob bound to at most 512 bytes
OVERHEAD = _HEADER + 24 + 16 + 2 + 512
#: most shared keys one side keeps (one X25519 multiplication each to remake)
CACHE_SIZE = 1024


class SealError(ValueError):
    """A sealed blob could not be opened: malformed, tampered with, or for another key."""


_NONCE = 24
#: where fresh random nonces come from
_nonces = RandomPool(_NONCE)


class _BoxCache:
    """The shared keys of one own secret key with peers, precomputed as a ``Box``
    does, by peer public key (z85 or raw, as ``to_raw`` says; decoding only happens
    on a miss)."""

    def __init__(self, secret: PrivateKey, to_raw: Callable[[bytes], bytes]) -> None:
        self.secret = secret
        self.to_raw = to_raw
        self.keys: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, peer: bytes) -> bytes:
        key = self.keys.get(peer)
        if key is None:
            key = Box(self.secret, PublicKey(self.to_raw(peer))).shared_key()
            self.keys[peer] = key
            if len(self.keys) > CACHE_SIZE:
                self.keys.popitem(last=False)
        else:
            self.keys.move_to_end(peer)
        return key


@functools.lru_cache(maxsize=CACHE_SIZE)
def _raw_key(z85_key: str) -> bytes:
    """A z85 public key's bytes (decoding one in Python is ~10 us; a client checks
    the sender of every result it opens)."""
    return z85.decode(z85_key)


#: the part a result is bound to when its job printed nothing (it has no output blob)
RESULT_ALONE = "result alone"


def binding(job_id: str, owner: str, status: str, encoding: str, result_from: str,
            part: str) -> bytes:
    """What a sealed blob is bound to (see the module's docstring)."""
    return "\x1f".join((job_id, owner, status, encoding, result_from, part)).encode()


class Sealer:
    """The monitor's side: seals blobs from its keypair to job owners."""

    def __init__(self, keys: Keypair) -> None:
        self.public_raw = z85.decode(keys.public)
        self._cache = _BoxCache(PrivateKey(z85.decode(keys.secret)), z85.decode)

    def seal(self, owner_z85: str | bytes, data: bytes, bind: bytes) -> bytes:
        """Encrypt ``data`` to the owner's public key (z85), bound to ``bind``. Empty
        data is sealed too, so that a blob cannot be blanked unnoticed."""
        owner = owner_z85.encode() if isinstance(owner_z85, str) else owner_z85
        nonce = _nonces.take()
        plain = b"".join((len(bind).to_bytes(2, "big"), bind, data))
        return b"".join((VERSION, self.public_raw, nonce,
                         crypto_box_easy_afternm(plain, nonce, self._cache.get(owner))))

    def seal_outcome(self, owner_z85: str, job: tuple[str, str, str, str, str],
                     result: bytes, output: bytes) -> tuple[bytes, bytes]:
        """A job's result and output sealed to its owner, bound to ``job`` (its id,
        owner, status, encoding and where the result came from): both blobs when it
        printed something, else the result alone (and an empty output)."""
        if not output:
            return self.seal(owner_z85, result, binding(*job, RESULT_ALONE)), b""
        return (self.seal(owner_z85, result, binding(*job, "result")),
                self.seal(owner_z85, output, binding(*job, "output")))


class Opener:
    """The client's side: opens blobs sealed to its keypair, by any monitor."""

    def __init__(self, keys: Keypair) -> None:
        self._cache = _BoxCache(PrivateKey(z85.decode(keys.secret)), bytes)

    def open(self, data: bytes, bind: bytes, sender_z85: str | None = None) -> bytes:
        """Decrypt a sealed blob, checking its binding and (when given) its sender;
        raises :class:`SealError` if anything does not match."""
        if len(data) < _HEADER + _NONCE + 16 + 2 or data[:1] != VERSION:
            raise SealError("not a sealed dsage blob bound to its job (missing, an unknown "
                            "format, or too short)")
        sender = bytes(data[1:_HEADER])
        if sender_z85 is not None and sender != _raw_key(sender_z85):
            raise SealError("sealed by another key than the worker that ran the job")
        key = self._cache.get(sender)
        try:
            plain = crypto_box_open_easy_afternm(bytes(data[_HEADER + _NONCE:]),
                                                 bytes(data[_HEADER:_HEADER + _NONCE]), key)
        except CryptoError:
            raise SealError("a sealed blob failed authentication: tampered with, or sealed "
                            "to another key") from None
        n = int.from_bytes(plain[:2], "big")
        if plain[2:2 + n] != bind:
            raise SealError("sealed for another job or another outcome (job id, owner, "
                            "status or encoding differ)")
        return plain[2 + n:]

    def open_outcome(self, result: bytes, output: bytes, job: tuple[str, str, str, str, str],
                     sender_z85: str | None = None) -> tuple[bytes, bytes]:
        """A job's result and output as :meth:`Sealer.seal_outcome` sealed them (no
        output blob: the result must say the job printed nothing)."""
        if not output:
            return self.open(result, binding(*job, RESULT_ALONE), sender_z85), b""
        return (self.open(result, binding(*job, "result"), sender_z85),
                self.open(output, binding(*job, "output"), sender_z85))
