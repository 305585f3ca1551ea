"""Who may call which of Triton's APIs: the admin key, its names on both protocols, and where it lives.

Triton's inference API has no user authentication; its admin APIs (shared-memory registration, the
model repository, model configs, statistics, trace and log settings) can be put behind a key with
`--http-restricted-api` and `--grpc-restricted-protocol` (both in 2.51). Every server this
repository starts does so; every tool of ours that calls those APIs sends the key. HTTP clients send
the header `admin-key: <key>`, gRPC clients the metadata `triton-grpc-protocol-admin-key: <key>`
(Triton prefixes the key name on gRPC). A call without it gets HTTP 403 / gRPC UNAVAILABLE.

Where the key comes from, in order: `SDXL_ADMIN_KEY`; a file (`--admin-key-file`, a Kubernetes
Secret's mount); else the supervisor generates one per start and writes it, mode 600, to
GENERATED_KEY_FILE, where the local tools (`make perf`, `python -m client --info`) find it.
docs/security.md has the threat model.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from .layout import REPO_ROOT

KEY_ENV = "SDXL_ADMIN_KEY"
KEY_NAME = "admin-key"  # Triton's restriction key: the HTTP header's name
HTTP_HEADER = KEY_NAME
GRPC_METADATA = f"triton-grpc-protocol-{KEY_NAME}"  # Triton's gRPC prefix + the key name
# Triton's API groups (2.51 and later): these need the key; health, metadata and inference stay open.
RESTRICTED_APIS = ("shared-memory", "model-config", "model-repository", "statistics", "trace", "logging")
OPEN_APIS = ("health", "metadata", "inference")
GENERATED_KEY_FILE = REPO_ROOT / "build" / "admin-key"
LOOPBACK = "127.0.0.1"

# Printable ASCII without spaces: a valid HTTP header value and gRPC metadata value, and one that
# Triton's `API,...:key=value` option carries whole. Long enough not to be guessed.
_KEY = re.compile(r"[\x21-\x7e]{16,256}")


class AdminKeyError(ValueError):
    pass


def generate_key() -> str:
    """A fresh key: 256 bits, URL-safe characters."""
    return secrets.token_urlsafe(32)


def check_key(key: str, source: str) -> str:
    """The key, or AdminKeyError naming its source (never its value) and what is accepted."""
    if not _KEY.fullmatch(key):
        raise AdminKeyError(f"the admin key from {source} is not accepted ({len(key)} characters): expected 16 to 256 "
                            "printable ASCII characters without spaces (python -c 'import secrets; "
                            "print(secrets.token_urlsafe(32))' makes one)")
    return key


def read_key_file(path: Path) -> str:
    """The key a file holds (surrounding whitespace, such as a final newline, ignored)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise AdminKeyError(f"cannot read the admin key file {path}: {error.strerror}") from None
    return check_key(text.strip(), str(path))


def write_key_file(path: Path, key: str) -> None:
    """Write the key readable by its owner only (created with mode 600, replaced whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    os.replace(partial, path)


def client_key(key_file: Path | None = None, environ=os.environ) -> str | None:
    """What a local tool sends: SDXL_ADMIN_KEY, else `key_file`, else the key the supervisor generated
    (GENERATED_KEY_FILE) where there is one; None where none is found."""
    if environ.get(KEY_ENV):
        return check_key(environ[KEY_ENV].strip(), KEY_ENV)
    if key_file is not None:
        return read_key_file(key_file)
    return read_key_file(GENERATED_KEY_FILE) if GENERATED_KEY_FILE.exists() else None


def headers(key: str | None, protocol: str) -> dict[str, str]:
    """The request headers (HTTP) or metadata (gRPC) that carry the key; none without a key."""
    if key is None:
        return {}
    return {HTTP_HEADER if protocol == "http" else GRPC_METADATA: key}


def restriction_args(key: str) -> list[str]:
    """tritonserver's options that put the admin APIs behind `key` on both protocols."""
    setting = f"{','.join(RESTRICTED_APIS)}:{KEY_NAME}={key}"
    return [f"--http-restricted-api={setting}", f"--grpc-restricted-protocol={setting}"]


def redact(args: list[str], key: str) -> list[str]:
    """A command line fit for a log: the key replaced wherever it appears."""
    return [arg.replace(key, "<admin-key>") for arg in args]


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
