"""Adapters in object storage (`s3://bucket/prefix/adapter`), fetched to local disk.

fsspec speaks each store's protocol (s3fs for S3 and S3-compatible stores; gcsfs and adlfs
give gs:// and az:// when installed). A source's files are looked up first (one metadata
request each): they must be there and fit `max_bytes` before a byte is downloaded. The download goes to a
temporary directory that is renamed into place, under a name made of the URL and each
object's size and ETag (or version), so a changed object is fetched again and an unchanged one
is not. The registry then records the content hash of what was read as the revision: a
replica that later fetches a registration recorded elsewhere checks the hash it reads against
it (ADAPTER_FILES_CHANGED when the object was replaced meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from loramux.server.adapters.chat_template import FILES as CHAT_TEMPLATE_FILES
from loramux.server.errors import AdapterInvalid, InvalidRequest, SourceNotFound, SourceOutsideRoot, SourceUnavailable
from loramux.server.settings import Settings
from loramux.server.tenancy.source_allowance import is_object_url  # noqa: F401 (re-exported)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PACKAGES = {"s3": "s3fs (the s3 extra: pip install 'loramux[s3]')", "gs": "gcsfs", "az": "adlfs"}
_CHUNK = 8 << 20


def check_object_url(source: str, field: str = "source") -> str:
    """`source` without a trailing '/': every component a plain name (no '', '.' or '..')."""
    protocol, rest = source.split("://", 1)
    parts = rest.rstrip("/").split("/")
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts):
        raise InvalidRequest(
            f"{source!r} must be {protocol}://bucket/path/to/adapter, with no empty, '.' or '..' component",
            field=field, reason="SOURCE_INVALID",
        )
    return f"{protocol}://{'/'.join(parts)}"


def under(url: str, prefix: str) -> bool:
    return url == prefix or url.startswith(prefix.rstrip("/") + "/")


class ObjectStores:
    """fsspec filesystems, one per protocol, and the local copies of fetched adapters."""

    def __init__(self, settings: Settings, max_bytes: int):
        self._settings = settings
        self._max_bytes = max_bytes
        self._filesystems: dict[str, object] = {}
        self._lock = threading.Lock()
        self._owned_cache = settings.object_cache_dir is None
        self.cache_dir = settings.object_cache_dir or Path(tempfile.mkdtemp(prefix="loramux-objects-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        if self._owned_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def filesystem(self, protocol: str):
        with self._lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                try:
                    import fsspec

                    # No listings cache, and an instance of our own: every read must see the store
                    # as it is now. A cached directory listing answered reads of registrations made
                    # by other replicas with "not found" for as long as the cache lived.
                    options = {"use_listings_cache": False, "skip_instance_cache": True}
                    if protocol == "s3" and self._settings.object_endpoint_url:
                        options["client_kwargs"] = {"endpoint_url": self._settings.object_endpoint_url}
                    fs = fsspec.filesystem(protocol, **options)
                except ImportError as e:
                    raise SourceUnavailable(
                        f"{protocol}:// needs the {_PACKAGES[protocol]} package installed in the server's image",
                        retry_after_s=60.0,
                    ) from e
                self._filesystems[protocol] = fs
            return fs

    def check_allowed(self, url: str, tenant_prefixes: tuple[str, ...] | None) -> None:
        if not any(under(url, root) for root in self._settings.object_roots):
            raise SourceOutsideRoot(
                f"{url!r} is not under an object root of this server (--object-root)",
                field="source", reason="SOURCE_NOT_ALLOWED", source=url,
            )
        if tenant_prefixes is not None and not any(under(url, prefix) for prefix in tenant_prefixes):
            raise SourceOutsideRoot(
                "this tenant's object-storage sources must lie under "
                f"{', '.join(tenant_prefixes) or 'no prefix'}",
                field="source", reason="SOURCE_NOT_ALLOWED", source=url,
            )

    def fetch(self, url: str) -> Path:
        """A local directory holding the adapter's files at `url`, downloaded if not cached."""
        protocol, path = url.split("://", 1)
        fs = self.filesystem(protocol)
        listing = self._list(fs, url, path)
        names = [CONFIG_FILE] + [next(n for n in WEIGHT_FILES if n in listing)] + [n for n in CHAT_TEMPLATE_FILES if n in listing]
        total = sum(int(listing[n].get("size") or 0) for n in names)
        if total > self._max_bytes:
            raise AdapterInvalid(
                f"the adapter's files at {url!r} hold {total} bytes, more than the {self._max_bytes} an adapter of "
                "max_lora_rank on every served module can need",
                reason="ADAPTER_TOO_LARGE",
            )
        tag = hashlib.sha256(json.dumps(
            [url] + [[n, listing[n].get("size"), _version(listing[n])] for n in names]
        ).encode()).hexdigest()[:32]
        final = self.cache_dir / tag
        if (final / ".complete").exists():
            return final
        tmp = self.cache_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name in names:
                self._download(fs, url, f"{path}/{name}", tmp / name, int(listing[name].get("size") or 0))
            (tmp / ".complete").touch()
            try:
                tmp.rename(final)
            except OSError:  # fetched meanwhile by another call: keep that copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def release(self, directory: Path) -> None:
        """Remove a local copy no registration uses any more."""
        if directory.parent == self.cache_dir:
            shutil.rmtree(directory, ignore_errors=True)

    def _list(self, fs, url: str, path: str) -> dict[str, dict]:
        """The adapter's files at `url`, by name, from one metadata request each (never a listing
        of the prefix: that could hold any number of objects)."""
        fs.invalidate_cache(path)  # a changed object must be seen as changed
        listing = {}

        def look(name: str) -> None:
            try:
                entry = fs.info(f"{path}/{name}")
            except FileNotFoundError:
                return
            except Exception as e:  # network, credentials, throttling
                raise SourceUnavailable(
                    f"{url!r} could not be read ({type(e).__name__}: {str(e)[:200]}); retry later", field="source",
                    retry_after_s=5.0,
                ) from e
            if entry.get("type") == "file":
                listing[name] = entry

        for name in (CONFIG_FILE, *WEIGHT_FILES):
            look(name)
            if name != CONFIG_FILE and name in listing:
                break  # the safetensors file is enough: the pickle one is not looked at
        for name in CHAT_TEMPLATE_FILES:  # the adapter's own chat template, when it ships one
            look(name)
        if CONFIG_FILE not in listing or not any(n in listing for n in WEIGHT_FILES):
            raise SourceNotFound(
                f"no adapter at {url!r} ({CONFIG_FILE} and {' or '.join(WEIGHT_FILES)} are needed)",
                field="source", source=url,
            )
        return listing

    def _download(self, fs, url: str, key: str, dest: Path, size: int) -> None:
        """Copy one object, refusing more bytes than its listing announced."""
        try:
            with fs.open(key, "rb") as src, open(dest, "wb") as out:
                copied = 0
                while chunk := src.read(min(_CHUNK, size + 1 - copied)):
                    copied += len(chunk)
                    if copied > size:
                        break
                    out.write(chunk)
        except Exception as e:
            raise SourceUnavailable(
                f"{url!r} could not be downloaded ({type(e).__name__}: {str(e)[:200]}); retry later", field="source",
                retry_after_s=5.0,
            ) from e
        if copied != size:
            raise SourceUnavailable(f"{url!r} changed while it was downloaded; retry", field="source", retry_after_s=1.0)


def _version(entry: dict) -> str:
    """What identifies one version of an object in a listing (S3 ETag; others' checksums)."""
    for key in ("ETag", "VersionId", "generation", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified"):
        if entry.get(key):
            return str(entry[key])
    return ""
