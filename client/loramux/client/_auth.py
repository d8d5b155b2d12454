"""The API key on every call: `authorization: Bearer <key>` metadata, added by an interceptor
(call credentials would need TLS; a development server may run without it)."""

from __future__ import annotations

import os

API_KEY_ENV = "LORAMUX_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else LORAMUX_API_KEY, else None (no credentials sent). Whitespace around
    it (a key read from a file ends with a newline) is dropped; a key with any other character a
    header cannot carry is a ValueError here, not a failed call later."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    key = key.strip() if key else key
    if key and not all(33 <= ord(c) < 127 for c in key):
        raise ValueError("the API key holds characters a header cannot carry (keys are printable ASCII, as "
                         "`loramux keys create` prints them)")
    return key or None


def key_header(api_key: str):
    """The header function for `_headers` interceptors: the same header on every call."""
    header = ("authorization", f"Bearer {api_key}")
    return lambda request: header


def resolve_tenant(tenant: str | None) -> str | None:
    """The tenant an operator acts for (`x-loramux-tenant`): given, or LORAMUX_TENANT; None: the key's own."""
    import os

    return tenant if tenant is not None else (os.environ.get("LORAMUX_TENANT") or None)


def tenant_header(tenant: str):
    """The header function for `_headers` interceptors: the operator's chosen tenant on every call."""
    header = ("x-loramux-tenant", tenant)
    return lambda request: header
