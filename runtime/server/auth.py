"""API-key check for stream connections: a bearer header, or a `token` query parameter for browsers
(which cannot set headers on a WebSocket). Compared in constant time."""

from __future__ import annotations

import hmac
from typing import Mapping


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>` first, else `?token=<key>`."""
    header = headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("token") or None


def authorized(api_key: str | None, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """True when no key is configured, or the request presents exactly that key."""
    if api_key is None:
        return True
    token = presented_token(headers, query)
    if token is None:
        return False
    # Header bytes that are not UTF-8 reach us as lone surrogates (aiohttp decodes with surrogateescape):
    # "surrogatepass" encodes any str, so such a header is simply a wrong key, not a server error.
    return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), api_key.encode("utf-8", "surrogatepass"))
