"""Credentials out of records and logs.

A URL may carry a secret: `http://user:password@host/v1` (userinfo) or
`...?api_key=...` (a query parameter). `redact_text` replaces both, wherever
they occur in a string, with `***`; `redact` does so for every string inside
a JSON-like value (manifest settings, summaries). The host, port and path
stay readable, so a record still says which endpoint was used.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ : userinfo is everything up to the last '@' before the host's end
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s@]*(?:@[^/?#\s@]*)*)@")
_SECRET_PARAMS = re.compile(
    r"(?P<key>[?&;](?:api[_\-]?key|key|token|access[_\-]?token|auth|password|passwd|secret|sig|signature)=)"
    r"(?P<value>[^&;#\s\"']+)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with URL userinfo and secret-bearing query parameters replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m.group('key')}{MASK}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with every string (keys too) passed through `redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
