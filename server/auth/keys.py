"""API keys: made by `python -m server keys add`, kept in a file that stores only their hashes.

A key looks like `keel_<key id>_<secret>`: 8 hex digits that name it, and 43
characters of secret (32 random bytes, URL-safe base64). The file holds one
JSON object per line:

    {"id": "3f9a1c07", "sha256": "<hex digest of the whole key>", "tenant": "acme",
     "role": "runner", "created": "2026-11-30T18:00:00+00:00"}

Keys have 256 bits of entropy, so one SHA-256 is as safe as a slow hash
would be and costs microseconds per call. A key is looked up by its id and
its digest compared in constant time. Blank lines and lines starting with #
are ignored; anything else that is not a valid entry stops the server at
start, naming the line.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_KEY = re.compile(r"keel_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class Role(enum.StrEnum):
    """What a caller may do (each role may do what the ones before it may)."""

    READER = "reader"  # read runs, threads, tasks, schedules, agents
    RUNNER = "runner"  # and start, resume and cancel runs; write threads and tasks
    ADMIN = "admin"  # and write schedules; and see every tenant

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.READER: 0, Role.RUNNER: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a call: their tenant and role."""

    tenant: str
    role: Role


class KeysFileError(Exception):
    """The keys file cannot be used; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    sha256: str
    tenant: str
    role: Role


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r}: 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


class KeyRing:
    """The keys of a keys file, by id."""

    def __init__(self, entries: dict[str, KeyEntry]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, key_id: str) -> bool:
        return key_id in self._entries

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read a keys file; KeysFileError when it is missing, unreadable or malformed."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise KeysFileError(f"keys file {path}: cannot read it: {exc.strerror}") from exc
        entries: dict[str, KeyEntry] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                raw = json.loads(line)
                entry = KeyEntry(
                    key_id=str(raw["id"]),
                    sha256=str(raw["sha256"]),
                    tenant=check_tenant(str(raw["tenant"])),
                    role=Role(raw["role"]),
                )
                if not re.fullmatch(r"[0-9a-f]{8}", entry.key_id):
                    raise ValueError(f"id {entry.key_id!r} is not 8 hex digits")
                if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
                    raise ValueError("sha256 is not 64 hex digits")
                if entry.key_id in entries:
                    raise ValueError(f"id {entry.key_id!r} appears twice")
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise KeysFileError(f"keys file {path}, line {number}: {problem}") from exc
            entries[entry.key_id] = entry
        return cls(entries)

    def caller(self, key: str) -> Caller | None:
        """The caller a key belongs to, or None for an unknown or malformed key."""
        match = _KEY.fullmatch(key)
        if match is None:
            return None
        entry = self._entries.get(match.group(1))
        if entry is None or not hmac.compare_digest(entry.sha256, _digest(key)):
            return None
        return Caller(entry.tenant, entry.role)


def add_key(path: Path, tenant: str, role: Role) -> str:
    """Make a key for (tenant, role), append its hash to the keys file, return the key."""
    check_tenant(tenant)
    existing = KeyRing.load(path) if path.exists() else KeyRing({})
    key_id = secrets.token_hex(4)
    while existing.has(key_id):
        key_id = secrets.token_hex(4)
    key = f"keel_{key_id}_{secrets.token_urlsafe(32)}"
    entry = {
        "id": key_id,
        "sha256": _digest(key),
        "tenant": tenant,
        "role": role.value,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    # Only hashes are stored, but who may read the file may list the tenants.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(json.dumps(entry) + "\n")
    return key
