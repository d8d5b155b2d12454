"""Who is calling, and may they: every RPC's credentials checked in one place.

A call carries `authorization: Bearer <key>`; the key names a tenant and a role
(`server/keys.py`). Roles, each allowed what the one before it is:

- user: Generate, GenerateStream, Tokenize, GetAdapter, ListAdapters;
- admin: also LoadAdapter, UnloadAdapter, Merge and the Operations service;
- operator: also GetServerInfo, and any tenant's data: an operator's call acts for the tenant
  named in `x-loramux-tenant` (its own key's tenant without one).

With mutual TLS (`--tls-client-ca`), a call without a key may be identified by its verified
client certificate instead: the keys file's `certificates` map common names to a tenant
and role. A key, when sent, decides.

A call without a key (or a known certificate), or with an unknown or expired key, is
UNAUTHENTICATED; a known key
whose role is too low, or a user or admin naming another tenant, is PERMISSION_DENIED. The
health and reflection services need no key (probes and tooling). With auth=none every call
is an operator of the default tenant (or of the tenant it names).
"""

from __future__ import annotations

import contextvars
import logging

from loramux.server.errors import PermissionDenied, Unauthenticated
from loramux.server.tenancy.keys import Identity, KeyStore, role_rank
from loramux.server.names import validate_adapter_id
from loramux.server.tenancy.quotas import Quotas, with_defaults
from loramux.server.settings import Settings
from loramux.server.tenancy.source_allowance import ANYWHERE, SourceAllowance

log = logging.getLogger(__name__)

TENANT_HEADER = "x-loramux-tenant"
METHOD_ROLES = {
    "Generate": "user",
    "GenerateStream": "user",
    "GetAdapter": "user",
    "ListAdapters": "user",
    "LoadAdapter": "admin",
    "UnloadAdapter": "admin",
    "Merge": "admin",
    "GetOperation": "admin",
    "ListOperations": "admin",
    "WaitOperation": "admin",
    "CancelOperation": "admin",
    "DeleteOperation": "admin",
    "GetServerInfo": "operator",
    "Tokenize": "user",
}
caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("loramux_caller")


class Authenticator:
    def __init__(self, settings: Settings, announce: bool = True):
        """`announce`: log the mode and the keys' count (an engine process of its own, whose
        server's process announced them, does not)."""
        self._settings = settings
        self.keys = KeyStore(settings.auth_keys_file) if settings.auth == "keys" else None
        if self.keys is not None:
            self.keys.watch()
        self._open = Identity(settings.default_tenant, "operator", "auth=none")
        if not announce:
            pass
        elif self.keys is None:
            log.warning("--auth none: every caller is an operator of any tenant, with no credentials; for development only")
        else:
            log.info("API keys from %s: %d keys", settings.auth_keys_file, len(self.keys))

    def quotas(self, tenant: str) -> Quotas:
        """The tenant's quotas: the keys file's, and the server's defaults for those it leaves out."""
        return with_defaults(self.keys.quotas(tenant) if self.keys is not None else None, self._settings)

    def close(self) -> None:
        """Stop watching the keys file."""
        if self.keys is not None:
            self.keys.close()

    def tenant_label(self, tenant: str) -> str:
        """The tenant as a metric label: tenants the keys file names (or, with auth=none, the
        default tenant) are themselves, any other is "other", so series stay bounded."""
        known = tenant in self.keys.tenant_names() if self.keys is not None else tenant == self._open.tenant
        return tenant if known else "other"

    def sources(self, tenant: str) -> SourceAllowance:
        """Where the tenant's adapters may come from, per the keys file (anywhere with auth=none)."""
        return self.keys.sources(tenant) if self.keys is not None else ANYWHERE

    def identify(self, method: str, metadata, peer_common_name: str | None = None) -> Identity:
        """The identity a call of `method` acts as, or Unauthenticated / PermissionDenied.
        `peer_common_name`: the CN of the client certificate TLS verified, if any."""
        headers: dict[str, str] = {}
        for key, value in metadata or ():
            if isinstance(value, str):
                headers.setdefault(key.lower(), value)
        if self.keys is None:
            identity = self._open
        else:
            token = headers.get("authorization", "")
            scheme, _, key = token.partition(" ")
            by_certificate = self.keys.identify_certificate(peer_common_name) if peer_common_name and not token else None
            if by_certificate is not None:
                identity = by_certificate
            elif not token:
                raise Unauthenticated("this server needs an API key: send 'authorization: Bearer <key>'")
            elif scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("the authorization header must be 'Bearer <key>'")
            else:
                identity = self.keys.identify(key.strip())
        needed = METHOD_ROLES[method]
        if role_rank(identity.role) < role_rank(needed):
            raise PermissionDenied(f"{method} needs the {needed} role; this key's role is {identity.role}",
                                   needed_role=needed, role=identity.role)
        named = headers.get(TENANT_HEADER)
        if named and named != identity.tenant:
            validate_adapter_id(named, TENANT_HEADER, reason="TENANT_INVALID")
            if identity.role != "operator":
                raise PermissionDenied("only an operator may act for another tenant", field=TENANT_HEADER)
            identity = Identity(named, identity.role, identity.name)
        return identity
