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

    expected_keys: 3              # optional: how many keys the file holds (see below)

A key is `lmx_` and 43 URL-safe characters (256 random bits), so an unsalted SHA-256 is
enough to store it (it cannot be guessed from its hash). Presented keys are hashed and
looked up by that hash: one dictionary lookup whatever the number of keys, whose time
depends only on the digest (which tells a caller nothing about the stored keys).

A watcher thread looks at the file every second and, when it changed (a mounted Kubernetes
Secret is replaced in place), parses it in a child process, so that a large file never
stalls the server's calls; a removed key stops working within a second or two of the file
changing. What a reload may do:
- a file that does not parse, is not a regular file, or is larger than 4 MiB or 100,000
  entries keeps the last good keys in force (logged once per version of the file);
- a missing file keeps the last good keys: a Secret being replaced vanishes for an instant,
  and a deleted file is never a revocation;
- a file holding fewer than half the keys in force (a write cut short, an emptied file)
  keeps the last good keys, unless it states `expected_keys` (then it must hold exactly that
  many, at start-up too): a large revocation, or revoking every key (`keys: []`,
  `expected_keys: 0`), is said deliberately. Restarting the server also takes the file as it is.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import reprlib
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from loramux.server.names import validate_adapter_id
from loramux.server.tenancy.source_allowance import ANYWHERE, SourceAllowance, is_object_url
from loramux.server.errors import InvalidSettings, LoramuxError, Unauthenticated
from loramux.server.tenancy.quotas import QUOTA_NAMES, UNLIMITED, Quotas

log = logging.getLogger(__name__)

ROLES = ("user", "admin", "operator")  # each may do what the ones before it may
KEY_PREFIX = "lmx_"
RELOAD_CHECK_S = 1.0
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024
MAX_IDENTITIES = 100_000  # keys and certificates in one file
RELOAD_TIMEOUT_S = 120.0  # a reload's parse (in its own process) that takes longer is abandoned
CHILD_MEMORY_BYTES = 2 << 30  # the address space the parsing process may take


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


def _shown(value) -> str:
    """A value from the file, shown briefly: an aliased YAML structure can be tiny as text and
    gigabytes as a repr."""
    return reprlib.repr(value)


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
            raise _bad(path, f"{where}: expires {_shown(value)} is not an ISO 8601 time") from None
    else:
        raise _bad(path, f"{where}: expires must be an ISO 8601 time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


_SECTIONS = {"keys", "certificates", "tenants", "expected_keys"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: about 3x faster


def _load(text: str, path: Path) -> dict:
    try:
        data = yaml.load(text, Loader=_Loader) if text.strip() else {"keys": []}
    except yaml.YAMLError as e:
        raise _bad(path, f"not YAML or JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise _bad(path, "must be a mapping with a 'keys' list")
    if set(data) - _SECTIONS:
        raise _bad(path, f"unknown sections {sorted(set(data) - _SECTIONS)}")
    if not isinstance(data.get("certificates", []), list):
        raise _bad(path, "certificates must be a list")
    if len(data["keys"]) + len(data.get("certificates", [])) > MAX_IDENTITIES:
        raise _bad(path, f"more than {MAX_IDENTITIES} keys and certificates")
    expected = data.get("expected_keys")
    if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool) or expected < 0):
        raise _bad(path, f"expected_keys must be a whole number >= 0, got {_shown(expected)}")
    if expected is not None and expected != len(data["keys"]):
        raise _bad(path, f"expected_keys is {expected} but the file holds {len(data['keys'])} keys (cut short, or edited "
                   "without updating it)")
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
        raise _bad(path, f"{where}: role must be one of {', '.join(ROLES)}, got {_shown(role)}")
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
            raise _bad(path, f"{where}: subject {_shown(subject)} appears twice")
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
                raise _bad(path, f"{where}.quotas.{name} must be a whole number >= 0, got {_shown(value)}")
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

    entries: dict[bytes, _Entry]  # by the SHA-256 of the key
    certificates: dict[str, Identity]
    tenants: dict[str, tuple[Quotas, SourceAllowance]]
    tenant_names: frozenset[str]  # every tenant it names (the bounded set of metric labels)
    expected_keys: int | None = None  # the count the file states (a deliberate shrink), if it does


def _keys_file(entries: list[_Entry], certificates: dict[str, Identity], tenants: dict, expected: int | None) -> KeysFile:
    names = frozenset([e.identity.tenant for e in entries] + [i.tenant for i in certificates.values()] + list(tenants))
    return KeysFile({e.digest: e for e in entries}, certificates, tenants, names, expected)


def parse_keys_file(text: str, path: Path) -> KeysFile:
    """A keys file's text, parsed once and checked; InvalidSettings naming what is wrong."""
    data = _load(text, path)
    return _keys_file(_keys(data, path), _certificates(data, path), _tenants(data, path), data.get("expected_keys"))


def _read_text(path: Path) -> tuple[str, tuple[int, int, int]]:
    """The keys file's text and version, bounded; a regular file only (a FIFO would block)."""
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _bad(path, "is not a regular file")
            if info.st_size > MAX_KEYS_FILE_BYTES:
                raise _bad(path, f"larger than {MAX_KEYS_FILE_BYTES} bytes")
            data = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})") from None
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise _bad(path, f"larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8"), (info.st_ino, info.st_mtime_ns, info.st_size)
    except UnicodeDecodeError:
        raise _bad(path, "is not UTF-8 text") from None


def _read(path: Path) -> tuple[KeysFile, tuple[int, int, int]]:
    text, version = _read_text(path)
    return parse_keys_file(text, path), version


class KeyStore:
    """The keys in force, from `path`; `identify` names a presented key's owner.

    The file is read in full at start-up (a bad file is an error there). Afterwards `check`
    looks at it (the watcher thread `watch` starts does so every RELOAD_CHECK_S) and, when it
    changed, parses it in a process of its own: a large file's parse holds a Python
    interpreter's lock for seconds, which in this process would stall every call. Callers
    never wait for a reload: they see the old keys or the new, whole.

    A reload is refused, the last good keys staying in force (logged at every look), when the
    file does not parse, is gone, or would drop more than half of the keys in force (a file
    cut short, or emptied by a failed write), unless it states `expected_keys` (then it must
    hold exactly that many, which makes a large revocation deliberate)."""

    def __init__(self, path: Path, clock=time.time):
        self.path = Path(path)
        self._clock = clock
        self._file, self._version = _read(self.path)  # at start-up a bad file is an error
        self._lock = threading.Lock()
        self._refused: tuple | None = None  # the version last refused, and why (logged once per version)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.reloads = 0

    def __len__(self) -> int:
        return len(self._file.entries)

    def watch(self) -> None:
        """Look at the file every RELOAD_CHECK_S on a thread of its own, until `close`."""
        def loop() -> None:
            while not self._stop.wait(RELOAD_CHECK_S):
                try:
                    self.check()
                except Exception:  # never let the watcher die: the keys in force stay
                    log.exception("keys file: the reload check failed; the last good keys stay in force")

        self._watcher = threading.Thread(target=loop, name="loramux-keys", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching (a reload under way finishes on its own: its thread is a daemon)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(2.0)

    def identify(self, key: str) -> Identity:
        """The identity of `key`, or Unauthenticated (unknown or expired keys say the same,
        but for the expiry, so that a caller knows to get a new key). One dictionary lookup
        by the key's SHA-256: how long it takes depends on the digest, which tells a caller
        nothing about any stored key."""
        found = self._file.entries.get(hashlib.sha256(key.encode("utf-8")).digest())
        if found is None:
            raise Unauthenticated("the API key is not valid; send 'authorization: Bearer <key>' with a key from your operator")
        if found.expires is not None and self._clock() >= found.expires:
            raise Unauthenticated("the API key has expired; ask your operator for a new one", reason="API_KEY_EXPIRED")
        return found.identity

    def tenant_names(self) -> frozenset[str]:
        """Every tenant the file names (keys, certificates, tenants)."""
        return self._file.tenant_names

    def quotas(self, tenant: str) -> Quotas | None:
        """The tenant's quotas from the file (None: it gives none)."""
        held = self._file.tenants.get(tenant)
        return held[0] if held is not None else None

    def sources(self, tenant: str) -> SourceAllowance:
        """Where the tenant's adapters may come from (anywhere the server allows, by default)."""
        return self._file.tenants.get(tenant, (UNLIMITED, ANYWHERE))[1]

    def identify_certificate(self, common_name: str) -> Identity | None:
        """The identity the keys file gives a verified client certificate's common name, if any."""
        return self._file.certificates.get(common_name)

    def check(self) -> bool:
        """Reload the file if it changed (blocking: the watcher thread, or a test); True if
        new keys are now in force."""
        with self._lock:
            try:
                info = os.stat(self.path)
            except OSError as e:
                self._refuse(("gone", e.errno), f"cannot be read ({e.strerror}); a missing file revokes nothing")
                return False
            version = (info.st_ino, info.st_mtime_ns, info.st_size)
            if version == self._version or (self._refused is not None and self._refused[0] == version):
                return False  # unchanged, or this very version was refused already
            try:
                keys_file = _parse_elsewhere(self.path)
            except InvalidSettings as e:
                self._refuse(version, e.message)
                return False
            held, new = len(self._file.entries), len(keys_file.entries)
            if keys_file.expected_keys is None and 2 * new < held:
                self._refuse(version, f"it holds {new} keys where {held} are in force: a file cut short or emptied is "
                             "never taken as a revocation; to remove that many, state `expected_keys: "
                             f"{new}` in the file")
                return False
            self._file, self._version = keys_file, version  # one assignment: readers see the old or the new
            self._refused = None
            self.reloads += 1
        log.info("keys file reloaded: %d keys", new)
        return True

    def _refuse(self, version, why: str) -> None:
        if self._refused != (version, why):
            self._refused = (version, why)
            log.error("keys file %s not reloaded, the last good keys stay in force: %s", self.path.name, why)


def _parse_elsewhere(path: Path) -> KeysFile:
    """Parse and check the keys file in a child process, and rebuild what it found here a few
    hundred entries at a time (letting other threads run between), so that no large parse
    holds this process's interpreter lock. InvalidSettings naming what is wrong."""
    # -P: the working directory is not put on the child's import path.
    child = subprocess.Popen([sys.executable, "-P", "-m", "loramux.server.tenancy.keys", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = threading.Timer(RELOAD_TIMEOUT_S, child.kill)  # a child that hangs while its output is read
    deadline.start()
    entries, certificates, tenants, expected, done = [], {}, {}, None, False
    try:
        for n, line in enumerate(child.stdout):
            kind, _, rest = line.rstrip(b"\n").partition(b"\t")
            if kind == b"K":
                digest, tenant, role, expires, name = rest.split(b"\t", 4)
                entries.append(_Entry(Identity(tenant.decode(), role.decode(), json.loads(name)), bytes.fromhex(digest.decode()),
                                      None if expires == b"-" else float(expires)))
            elif kind == b"C":
                subject, tenant, role, name = json.loads(rest)
                certificates[subject] = Identity(tenant, role, name)
            elif kind == b"T":
                tenant, quotas, sources = json.loads(rest)
                tenants[tenant] = (Quotas(**quotas), SourceAllowance(**{k: None if v is None else tuple(v)
                                                                         for k, v in sources.items()}))
            elif kind == b"E":
                expected = json.loads(rest)
            elif kind == b"D":
                done = True
            if n % 256 == 255:
                time.sleep(0)  # let the event loop's thread run
        error = child.stderr.read(4096).decode("utf-8", "replace").strip()
        child.wait(RELOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        raise _bad(path, f"took longer than {RELOAD_TIMEOUT_S:g}s to parse") from None
    finally:
        deadline.cancel()
        if child.poll() is None:
            child.kill()
        child.wait()  # reaped, never a zombie
        child.stdout.close()
        child.stderr.close()
    if child.returncode != 0 or not done:
        raise _bad(path, error.removeprefix(f"keys file {path.name}: ") or f"its parse ended with {child.returncode}")
    return _keys_file(entries, certificates, tenants, expected)


def _child_main(path: str) -> int:
    """`python -m loramux.server.tenancy.keys PATH`: parse and check a keys file, write what it holds
    one line per entry (read by `_parse_elsewhere`)."""
    out = sys.stdout.buffer
    try:  # a file that makes the parse grow without bound fails here, not in the server
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    try:
        keys_file, _ = _read(Path(path))
    except InvalidSettings as e:
        sys.stderr.write(e.message)
        return 2
    except MemoryError:
        sys.stderr.write(f"keys file {Path(path).name}: does not parse within {CHILD_MEMORY_BYTES >> 30} GiB")
        return 2
    for entry in keys_file.entries.values():
        identity = entry.identity
        expires = "-" if entry.expires is None else repr(entry.expires)
        out.write(f"K\t{entry.digest.hex()}\t{identity.tenant}\t{identity.role}\t{expires}\t"
                  f"{json.dumps(identity.name)}\n".encode())
    for subject, identity in keys_file.certificates.items():
        out.write(b"C\t" + json.dumps([subject, identity.tenant, identity.role, identity.name]).encode() + b"\n")
    for tenant, (quotas, sources) in keys_file.tenants.items():
        out.write(b"T\t" + json.dumps([tenant, dataclasses.asdict(quotas), dataclasses.asdict(sources)]).encode() + b"\n")
    out.write(b"E\t" + json.dumps(keys_file.expected_keys).encode() + b"\nD\n")
    out.flush()
    return 0


def append_key(path: Path, tenant: str, role: str, name: str = "", expires: str | None = None) -> str:
    """Make a new key for `tenant` with `role`, add its hash to the keys file (created if
    missing; YAML, or JSON for a .json file), and return the key: it is shown only once."""
    path = Path(path)
    data = _editable(path)
    key = new_key()
    entry = {"name": name, "tenant": tenant, "role": role, "sha256": hash_key(key)}
    if expires:
        entry["expires"] = expires
    data["keys"].append(entry)
    _write(path, data)
    return key


def list_keys(path: Path) -> list[dict]:
    """The file's keys as an operator may see them: name, tenant, role, expiry and `id` (the
    first 12 hex digits of the key's hash, which names it to revoke and rotate); never a key."""
    return [_listed(item) for item in _editable(Path(path), missing_ok=False)["keys"] if isinstance(item, dict)]


def revoke_key(path: Path, which: str) -> dict:
    """Remove the key named `which` (its name, or its id: a prefix of its hash); returns what
    was removed (as list_keys shows it). The server stops accepting it at its next reload."""
    path = Path(path)
    data = _editable(path)
    index = _find(data, which, path)
    removed = data["keys"].pop(index)
    # Said outright: the server refuses a reload that drops half its keys or more unless the
    # file expects it (a truncated file must not lock everyone out), and a revocation must apply.
    data["expected_keys"] = len(data["keys"])
    _write(path, data)
    return _listed(removed)


def rotate_key(path: Path, which: str, old_expires: str) -> tuple[str, dict]:
    """A new key with the tenant, role and name of the key `which` names; that key now expires
    at `old_expires` (ISO 8601), so callers have until then to switch. Returns the new key
    (shown only once) and the old key's entry as list_keys shows it."""
    path = Path(path)
    data = _editable(path)
    old = data["keys"][_find(data, which, path)]
    if old.get("expires") is None or _expiry(old_expires, path, "expires") < _expiry(old["expires"], path, "expires"):
        old["expires"] = old_expires  # never later than it already was: a rotation cannot revive a key
    key = new_key()
    data["keys"].append({"name": old.get("name", ""), "tenant": old.get("tenant"), "role": old.get("role"),
                         "sha256": hash_key(key)})
    _write(path, data)
    return key, _listed(old)


def _find(data: dict, which: str, path: Path) -> int:
    matches = [i for i, item in enumerate(data["keys"]) if isinstance(item, dict) and which
               and (item.get("name") == which or str(item.get("sha256", "")).lower().startswith(which.lower()))]
    if not matches:
        raise _bad(path, f"no key is named {which!r} (give a key's name, or its id from `loramux keys list`)")
    if len(matches) > 1:
        raise _bad(path, f"{len(matches)} keys match {which!r}: give the id of one (`loramux keys list`)")
    return matches[0]


def _listed(entry: dict) -> dict:
    """A key's entry as an operator may see it: its id (the first 12 hex digits of its hash),
    name, tenant, role and expiry; never the key."""
    return {"id": str(entry.get("sha256", ""))[:12], "name": entry.get("name", ""), "tenant": entry.get("tenant"),
            "role": entry.get("role"), "expires": _iso(entry.get("expires"))}


def _iso(value) -> str | None:
    """An expiry as ISO 8601 with its zone (UTC when the file gives none)."""
    if value is None:
        return None
    moment = datetime.datetime.fromtimestamp(_expiry(value, Path("keys"), "expires"), datetime.timezone.utc)
    return moment.isoformat()


def _editable(path: Path, missing_ok: bool = True) -> dict:
    """The file's data to change, read once as the server reads it (bounded, a regular file,
    refused when it does not parse); an empty file's when it is missing and `missing_ok`."""
    if missing_ok and not path.exists() and not path.is_symlink():
        return {"keys": []}
    text, _ = _read_text(path)
    parse_keys_file(text, path)
    return _load(text, path)


def _write(path: Path, data: dict) -> None:
    """Write the keys file whole, atomically, readable by its owner only; checked first."""
    if data.get("expected_keys") is not None:
        data["expected_keys"] = len(data["keys"])
    text = json.dumps(data, indent=2, default=str) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    parse_keys_file(text, path)  # every entry is valid (tenant, role, expiry)
    path = path.resolve()  # a symlinked keys file: the file it points at is the one replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = path.stat()  # the server reads it as it is: keep its mode and owner
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, stat.S_IMODE(before.st_mode) if before else 0o600)
        if before is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp, before.st_uid, before.st_gid)
            except PermissionError:  # not ours to give away: it stays the writer's
                pass
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
