"""API keys: who a caller is (tenant and role), from a keys file that holds only hashes.

The keys file is YAML (or JSON, which YAML reads too):

    keys:
      - name: ci-bot              # optional label, shown in logs
        tenant: team-a
        role: admin               # user, admin or operator
        sha256: 9f86d08...        # hex SHA-256 of the key; the key itself is never stored
        expires: 2027-06-30T00:00:00Z   # optional
    certificates:                 # optional: callers known by their client certificate (mutual TLS)
      - subject: billing-svc      # the certificate's common name (CN)
        tenant: team-b
        role: user
    tenants:                      # optional, per tenant
      team-a:
        quotas: {adapters: 50, pinned: 2, requests: 32, tokens_per_minute: 200000, merges: 1}
        sources: {roots: [team-a], hub: [acme]}   # <adapter root>/team-a, and hf://acme/... only

A key is `lmx_` and 43 URL-safe characters (256 random bits), so an unsalted SHA-256 is
enough to store it (it cannot be guessed from its hash). Presented keys are hashed and
compared with every entry's hash in constant time. The file is looked at again at most once
a second and reloaded when it changed (a mounted Kubernetes Secret is replaced in place): a
removed key stops working within a second. A file that no longer parses keeps the last good
keys in force, and says so in the log at every look until it is fixed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

import yaml

from loramux.server.adapters.registry import validate_adapter_id
from loramux.server.adapters.objects import is_object_url
from loramux.server.adapters.sources import ANYWHERE, SourceAllowance
from loramux.server.errors import InvalidSettings, LoramuxError, Unauthenticated
from loramux.server.quotas import QUOTA_NAMES, UNLIMITED, Quotas

log = logging.getLogger(__name__)

ROLES = ("user", "admin", "operator")  # each may do what the ones before it may
KEY_PREFIX = "lmx_"
RELOAD_CHECK_S = 1.0
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024


def role_rank(role: str) -> int:
    return ROLES.index(role)


@dataclasses.dataclass(frozen=True)
class Identity:
    tenant: str
    role: str
    name: str = ""  # the key's label


@dataclasses.dataclass(frozen=True)
class _Entry:
    identity: Identity
    digest: bytes  # SHA-256 of the key
    expires: float | None  # epoch seconds


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _bad(path: Path, message: str) -> InvalidSettings:
    return InvalidSettings(f"keys file {path.name}: {message}", field="auth_keys_file")


def _expiry(value, path: Path, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, datetime.date):
        moment = datetime.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _bad(path, f"{where}: expires {value!r} is not an ISO 8601 time") from None
    else:
        raise _bad(path, f"{where}: expires must be an ISO 8601 time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _load(text: str, path: Path) -> dict:
    try:
        data = yaml.safe_load(text) if text.strip() else {"keys": []}
    except yaml.YAMLError as e:
        raise _bad(path, f"not YAML or JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise _bad(path, "must be a mapping with a 'keys' list")
    if set(data) - {"keys", "certificates", "tenants"}:
        raise _bad(path, f"unknown sections {sorted(set(data) - {'keys', 'certificates', 'tenants'})}")
    if not isinstance(data.get("certificates", []), list):
        raise _bad(path, "certificates must be a list")
    return data


def _tenant_and_role(item: dict, path: Path, where: str) -> tuple[str, str]:
    tenant, role = item.get("tenant"), item.get("role")
    if not isinstance(tenant, str):
        raise _bad(path, f"{where}: tenant is required")
    try:
        validate_adapter_id(tenant, "tenant")  # the same alphabet as ids
    except LoramuxError as e:
        raise _bad(path, f"{where}: {e.message}") from None
    if role not in ROLES:
        raise _bad(path, f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    return tenant, role


def _certificates(data: dict, path: Path) -> dict[str, Identity]:
    """Client certificate common name -> identity, from a keys file's `certificates`."""
    out: dict[str, Identity] = {}
    for i, item in enumerate(data.get("certificates", [])):
        where = f"certificates[{i}]"
        if not isinstance(item, dict):
            raise _bad(path, f"{where} must be a mapping")
        unknown = set(item) - {"subject", "tenant", "role", "name"}
        if unknown:
            raise _bad(path, f"{where}: unknown fields {sorted(unknown)}")
        subject = item.get("subject")
        if not isinstance(subject, str) or not 0 < len(subject) <= 256:
            raise _bad(path, f"{where}: subject (the certificate's common name) is required")
        if subject in out:
            raise _bad(path, f"{where}: subject {subject!r} appears twice")
        tenant, role = _tenant_and_role(item, path, where)
        out[subject] = Identity(tenant, role, str(item.get("name", subject)))
    return out


def _tenants(data: dict, path: Path) -> dict[str, tuple[Quotas, SourceAllowance]]:
    """Tenant -> its quotas and source allowance, from a keys file's `tenants` section."""
    section = data.get("tenants") or {}
    if not isinstance(section, dict):
        raise _bad(path, "tenants must be a mapping of tenant -> {quotas: {...}, sources: {...}}")
    out = {}
    for tenant, item in section.items():
        where = f"tenants.{tenant}"
        try:
            validate_adapter_id(str(tenant), "tenant")
        except LoramuxError as e:
            raise _bad(path, f"{where}: {e.message}") from None
        if not isinstance(item, dict) or set(item) - {"quotas", "sources"} or not isinstance(item.get("quotas", {}), dict):
            raise _bad(path, f"{where} must be a mapping with 'quotas' and 'sources' mappings")
        quotas = item.get("quotas", {})
        unknown = set(quotas) - set(QUOTA_NAMES)
        if unknown:
            raise _bad(path, f"{where}.quotas: unknown {sorted(unknown)} (known: {', '.join(QUOTA_NAMES)})")
        for name, value in quotas.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(path, f"{where}.quotas.{name} must be a whole number >= 0, got {value!r}")
        out[str(tenant)] = (Quotas(**quotas), _sources(item.get("sources"), path, where))
    return out


def _sources(item, path: Path, where: str) -> SourceAllowance:
    if item is None:
        return ANYWHERE
    if not isinstance(item, dict) or set(item) - {"roots", "hub", "objects"}:
        raise _bad(path, f"{where}.sources must be a mapping of 'roots', 'hub' and 'objects' lists")
    lists = {}
    for name in ("roots", "hub", "objects"):
        value = item.get(name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise _bad(path, f"{where}.sources.{name} must be a list of names")
        if name == "roots" and value and any(Path(v).is_absolute() or ".." in Path(v).parts for v in value):
            raise _bad(path, f"{where}.sources.roots are directories under the adapter roots (relative, without '..')")
        if name == "objects" and value and not all(is_object_url(v) for v in value):
            raise _bad(path, f"{where}.sources.objects are object-storage URL prefixes (s3://bucket/prefix)")
        lists[name] = tuple(v.rstrip("/") for v in value) if value is not None else None
    return SourceAllowance(roots=lists["roots"], hub_orgs=lists["hub"], object_prefixes=lists["objects"])


def _keys(data: dict, path: Path) -> list[_Entry]:
    """The key entries of a keys file."""
    entries, seen = [], set()
    for i, item in enumerate(data["keys"]):
        where = f"keys[{i}]"
        if not isinstance(item, dict):
            raise _bad(path, f"{where} must be a mapping")
        unknown = set(item) - {"name", "tenant", "role", "sha256", "expires"}
        if unknown:
            raise _bad(path, f"{where}: unknown fields {sorted(unknown)}")
        tenant, role = _tenant_and_role(item, path, where)
        digest = item.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or set(digest.lower()) - set("0123456789abcdef"):
            raise _bad(path, f"{where}: sha256 must be 64 hex digits (the key's hash, never the key)")
        if digest.lower() in seen:
            raise _bad(path, f"{where}: the same key hash appears twice")
        seen.add(digest.lower())
        name = item.get("name", "")
        if not isinstance(name, str) or len(name) > 128:
            raise _bad(path, f"{where}: name must be a string of at most 128 characters")
        entries.append(_Entry(Identity(tenant, role, name), bytes.fromhex(digest), _expiry(item.get("expires"), path, where)))
    return entries


@dataclasses.dataclass(frozen=True)
class KeysFile:
    """What a keys file says, parsed and checked."""

    entries: list[_Entry]
    certificates: dict[str, Identity]
    tenants: dict[str, tuple[Quotas, SourceAllowance]]
    tenant_names: frozenset[str]  # every tenant it names (the bounded set of metric labels)


def parse_keys_file(text: str, path: Path) -> KeysFile:
    """A keys file's text, parsed once and checked; InvalidSettings naming what is wrong."""
    data = _load(text, path)
    entries, certificates, tenants = _keys(data, path), _certificates(data, path), _tenants(data, path)
    names = frozenset([e.identity.tenant for e in entries] + [i.tenant for i in certificates.values()] + list(tenants))
    return KeysFile(entries, certificates, tenants, names)


def _read(path: Path) -> tuple[KeysFile, tuple[int, int, int]]:
    try:
        stat = path.stat()
        if stat.st_size > MAX_KEYS_FILE_BYTES:
            raise _bad(path, f"larger than {MAX_KEYS_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise _bad(path, "is not UTF-8 text") from None
    return parse_keys_file(text, path), (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class KeyStore:
    """The keys in force, from `path`; `identify` names a presented key's owner."""

    def __init__(self, path: Path, clock=time.time):
        self.path = Path(path)
        self._clock = clock
        self._file, self._version = _read(self.path)  # at start-up a bad file is an error
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._file.entries)

    def identify(self, key: str) -> Identity:
        """The identity of `key`, or Unauthenticated (unknown or expired keys say the same,
        but for the expiry, so that a caller knows to get a new key)."""
        self._maybe_reload()
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = None
        for entry in self._file.entries:  # no early exit: the time taken does not depend on which matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise Unauthenticated("the API key is not valid; send 'authorization: Bearer <key>' with a key from your operator")
        if found.expires is not None and self._clock() >= found.expires:
            raise Unauthenticated("the API key has expired; ask your operator for a new one", reason="API_KEY_EXPIRED")
        return found.identity

    def tenant_names(self) -> frozenset[str]:
        """Every tenant the file names (keys, certificates, tenants)."""
        self._maybe_reload()
        return self._file.tenant_names

    def quotas(self, tenant: str) -> Quotas:
        """The tenant's quotas (unlimited when the file gives none)."""
        self._maybe_reload()
        return self._file.tenants.get(tenant, (UNLIMITED, ANYWHERE))[0]

    def sources(self, tenant: str) -> SourceAllowance:
        """Where the tenant's adapters may come from (anywhere the server allows, by default)."""
        self._maybe_reload()
        return self._file.tenants.get(tenant, (UNLIMITED, ANYWHERE))[1]

    def identify_certificate(self, common_name: str) -> Identity | None:
        """The identity the keys file gives a verified client certificate's common name, if any."""
        self._maybe_reload()
        return self._file.certificates.get(common_name)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            try:
                stat = self.path.stat()
                if (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._version:
                    return
                keys_file, version = _read(self.path)
            except (OSError, InvalidSettings) as e:
                log.error("keys file not reloaded, the last good keys stay in force: %s", getattr(e, "message", e))
                return
            self._file, self._version = keys_file, version  # one assignment: readers see the old or the new
            log.info("keys file reloaded: %d keys", len(keys_file.entries))


def append_key(path: Path, tenant: str, role: str, name: str = "", expires: str | None = None) -> str:
    """Make a new key for `tenant` with `role`, add its hash to the keys file (created if
    missing; YAML, or JSON for a .json file), and return the key: it is shown only once."""
    path = Path(path)
    entries_data: dict = {"keys": []}
    if path.exists():
        _read(path)  # refuse to append to a file that does not parse
        entries_data = yaml.safe_load(path.read_text(encoding="utf-8")) or {"keys": []}
    key = new_key()
    entry = {"name": name, "tenant": tenant, "role": role, "sha256": hash_key(key)}
    if expires:
        entry["expires"] = expires
    entries_data["keys"].append(entry)
    text = json.dumps(entries_data, indent=2, default=str) + "\n" if path.suffix == ".json" else yaml.safe_dump(entries_data, sort_keys=False)
    parse_keys_file(text, path)  # the new entry is valid (tenant, role, expiry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return key
