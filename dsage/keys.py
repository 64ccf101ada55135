"""The dsage home folder and its keys.

Layout of ``$DSAGE_HOME`` (default ``~/.sage/dsage``)::

    dsage_key            secret CURVE certificate (mode 0600)
    dsage_key.pub        public CURVE certificate
    authorized_keys/     NAME.pub: public keys the broker trusts
    db/                  the broker's SQLite job store
    tmp_worker_files/    per-job working folders of local monitors
    logs/                logs of processes started by ``start_all``

Certificates use the ZeroMQ format that ``zmq.auth.load_certificate`` reads.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

SECRET_NAME = "dsage_key"
PUBLIC_NAME = "dsage_key.pub"
SELF_NAME = "self"
_Z85_KEY = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class KeyProblem(Exception):
    """Base for problems with keys; the message says what to do."""


class NoKeypair(KeyProblem):
    """There is no dsage keypair yet."""


class InsecureKeyFile(KeyProblem):
    """The secret key file is readable by group or others."""


class BadKey(KeyProblem):
    """A key or key file could not be read."""


class HomeUnusable(KeyProblem):
    """The dsage home, or a folder in it, cannot be made or used."""


def home(path: str | os.PathLike[str] | None = None) -> Path:
    """The dsage home folder: ``path``, else ``$DSAGE_HOME``, else ``~/.sage/dsage``."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("DSAGE_HOME") or "~/.sage/dsage").expanduser()


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair, both halves z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes


_SECRET_BANNER = """#   ****  Generated on {0} by dsage  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {0} by dsage  ****
#   ZeroMQ CURVE Public Certificate

"""


#: what an authorized key may do: submit jobs (client), run them (worker), or both
ROLES = ("client", "worker", "both")
_ROLE_LINE = re.compile(r'^\s+role\s*=\s*"([a-z]+)"\s*$', re.M)


def certificate_text(public: bytes, secret: bytes | None = None, role: str | None = None) -> str:
    """A certificate in the ZeroMQ format (as ``zmq.auth.create_certificates`` writes),
    with the key's role in its metadata section when given."""
    banner = (_SECRET_BANNER if secret else _PUBLIC_BANNER).format(datetime.datetime.now())
    meta = [f'    role = "{role}"'] if role else []
    lines = [banner + "metadata", *meta, "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` (never through a symlink, never over an existing file), 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise BadKey(f"{path} exists (a symbolic link?): dsage does not write its secret "
                     f"key over or through anything; remove it and try again") from None
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_public(path: Path, text: str) -> None:
    """Write a public key file (0644), replacing a file there but never following a
    symlink planted in its place."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadKey(f"{path} is a symbolic link: dsage does not write key files "
                         f"through links; remove it and try again") from None
        raise
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def private_dir(path: Path) -> None:
    """Make ``path`` a folder only its owner may use (0700), whatever the umask; a
    symlink in its place is refused."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # (a link, or a file: said below)
    except OSError as e:
        raise HomeUnusable(f"cannot make the folder {path}: {e.strerror}; give a dsage home "
                           f"you can write (DSAGE_HOME, --home or home=)") from None
    if path.is_symlink():
        raise BadKey(f"{path} is a symbolic link: dsage does not follow links for its "
                     f"own folders; remove it and run `dsage setup`")
    if not path.is_dir():
        raise HomeUnusable(f"{path} is a file, where dsage keeps a folder; move it, or give "
                           f"another dsage home (DSAGE_HOME, --home or home=)")
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)


def check_not_writable_by_others(path: Path, what: str) -> None:
    """Refuse a key folder or file that group or others may write, as sshd's
    StrictModes does: whoever can write it could authorize their own key."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o022:
        raise InsecureKeyFile(
            f"permissions {mode:04o} for {what} '{path}' let others change which keys are "
            f"trusted; run `chmod go-w {path}`")


def setup(path: str | os.PathLike[str] | None = None, *, quiet: bool = True) -> bool:
    """Create the dsage home folder and keypair if missing.

    Idempotent: existing keys and folders are left exactly as they are.
    Returns True when a new keypair was made.
    """
    root = home(path)
    for sub in ("", "db", "tmp_worker_files", "authorized_keys", "logs"):
        private_dir(root / sub)
    secret_file, public_file = root / SECRET_NAME, root / PUBLIC_NAME
    created = False
    if not secret_file.exists() and not secret_file.is_symlink():
        public, secret = zmq.curve_keypair()
        _write_private(secret_file, certificate_text(public, secret))
        _write_public(public_file, certificate_text(public))
        created = True
        if not quiet:
            print(f"dsage: created a new keypair in {root}")
    keys = load_keypair(root)
    if not public_file.exists():
        _write_public(public_file, certificate_text(keys.public))
    own = root / "authorized_keys" / f"{SELF_NAME}.pub"
    if not own.exists():
        _write_public(own, certificate_text(keys.public, role="both"))
    return created


def has_keypair(path: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``dsage setup`` has been run for this home."""
    return (home(path) / SECRET_NAME).exists()


def check_permissions(secret_file: Path) -> None:
    """Refuse a secret key file that group or others may read, as ssh does."""
    mode = stat.S_IMODE(secret_file.stat().st_mode)
    if mode & 0o077:
        raise InsecureKeyFile(
            f"permissions {mode:04o} for '{secret_file}' are too open: the secret key "
            f"must be readable by its owner only; run `chmod 600 {secret_file}`"
        )


def load_keypair(path: str | os.PathLike[str] | None = None) -> Keypair:
    """The keypair in a dsage home, after checking the secret file's permissions."""
    secret_file = home(path) / SECRET_NAME
    if not secret_file.exists():
        raise NoKeypair(f"no dsage keypair in {home(path)}: run `dsage setup` first")
    check_permissions(secret_file)
    public, secret = _read_certificate(secret_file)
    if secret is None:
        raise BadKey(f"{secret_file} holds no secret key: remove it and run `dsage setup`")
    return Keypair(public, secret)


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise BadKey(f"cannot read the key file {path}: {e}") from None
    if not _Z85_KEY.match(public) or (secret is not None and not _Z85_KEY.match(secret)):
        raise BadKey(f"{path} does not hold a 40-character z85 CURVE key")
    return public, secret


def looks_like_key(text: str) -> bool:
    """Whether ``text`` is 40 z85 characters (a key given on a command line)."""
    return bool(_Z85_KEY.match(text.encode(errors="replace")))


def parse_public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    """A z85 public key given as the key itself or as a certificate file's path."""
    raw = os.fsencode(value) if isinstance(value, os.PathLike) else value
    raw = raw.encode() if isinstance(raw, str) else raw
    if _Z85_KEY.match(raw.strip()) and not os.path.exists(raw):
        return raw.strip()
    path = Path(os.fsdecode(raw)).expanduser()
    if not path.exists():
        raise BadKey(f"'{os.fsdecode(raw)}' is neither a 40-character z85 key nor a key file")
    return _read_certificate(path)[0]


def public_key_file(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the own public certificate is."""
    return home(path) / PUBLIC_NAME


def authorized_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder of trusted public keys."""
    return home(path) / "authorized_keys"


def authorized_keys(path: str | os.PathLike[str] | None = None) -> dict[str, bytes]:
    """Trusted keys by name (file stem); unreadable files are skipped."""
    return {name: key for name, (key, _) in authorized_roles(path).items()}


def authorized_roles(path: str | os.PathLike[str] | None = None
                     ) -> dict[str, tuple[bytes, str]]:
    """Trusted keys and their roles by name. A file without a role is a client's
    (the least a key can be); the own key, ``self.pub``, is always both."""
    folder = authorized_dir(path)
    out: dict[str, tuple[bytes, str]] = {}
    if not folder.is_dir():
        return out
    check_not_writable_by_others(folder, "the authorized keys folder")
    for f in sorted(folder.glob("*.pub")):
        check_not_writable_by_others(f, "the authorized key")
        try:
            key = _read_certificate(f)[0]
            m = _ROLE_LINE.search(f.read_text(errors="replace"))
        except (BadKey, OSError):
            continue
        role = m.group(1) if m and m.group(1) in ROLES else "client"
        out[f.stem] = (key, "both" if f.stem == SELF_NAME else role)
    return out


_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def add_key(name: str, key: str | bytes, path: str | os.PathLike[str] | None = None,
            role: str = "client") -> Path:
    """Trust ``key`` (z85 or a key file) under ``name`` in ``role`` (client, worker or
    both); returns the file written. Adding a name again replaces its key and role."""
    if not _NAME.match(name) or name.startswith("."):
        raise BadKey(f"'{name}' is not a valid key name (letters, digits, _ . @ -)")
    if role not in ROLES:
        raise BadKey(f"role '{role}' is not one of {', '.join(ROLES)}")
    public = parse_public_key(key)
    target = authorized_dir(path) / f"{name}.pub"
    private_dir(authorized_dir(path))
    _write_public(target, certificate_text(public, role=role))
    return target


def remove_key(name: str, path: str | os.PathLike[str] | None = None) -> None:
    """Stop trusting the key stored under ``name``."""
    target = authorized_dir(path) / f"{name}.pub"
    if not _NAME.match(name) or not target.exists():
        raise BadKey(f"no authorized key named '{name}' (see `dsage keys list`)")
    target.unlink()


WORKERS_DIR = "worker_keys"


def worker_key_dir(name: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Where ``issue_worker_key(name)`` keeps the keypair it made for a machine."""
    if not _NAME.match(name) or name.startswith("."):
        raise BadKey(f"'{name}' is not a valid key name (letters, digits, _ . @ -)")
    return home(path) / WORKERS_DIR / name


def issue_worker_key(name: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Make a keypair for one machine's monitor, trusted with the worker role only
    (it runs jobs, never submits them), in ``worker_key_dir(name)``; returns that
    folder. Its two files become the dsage keypair of the machine's home."""
    folder = worker_key_dir(name, path)
    if (folder / SECRET_NAME).exists() or name == SELF_NAME:
        raise BadKey(f"a worker key named '{name}' exists already ({folder}); to replace "
                     f"it, run `dsage keys remove {name}` and remove that folder")
    private_dir(home(path) / WORKERS_DIR)
    private_dir(folder)
    public, secret = zmq.curve_keypair()
    _write_private(folder / SECRET_NAME, certificate_text(public, secret))
    _write_public(folder / PUBLIC_NAME, certificate_text(public))
    add_key(name, public, path, role="worker")
    return folder
