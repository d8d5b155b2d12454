"""The API key on every call: `authorization: Bearer <key>` metadata, added by an interceptor
(call credentials would need TLS; a development server may run without it)."""

from __future__ import annotations

import os

API_KEY_ENV = "LORAMUX_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else LORAMUX_API_KEY, else None (no credentials sent)."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def key_header(api_key: str):
    """The header function for `_headers` interceptors: the same header on every call."""
    header = ("authorization", f"Bearer {api_key}")
    return lambda request: header
