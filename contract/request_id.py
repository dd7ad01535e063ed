"""The request id one call carries through the client, nginx, the gateway and TF Serving.

HTTP: the `X-Request-ID` header. gRPC: the `x-request-id` metadata key (keys are lower case). A
valid id is 1..64 characters of [A-Za-z0-9._-]: the gateway keeps such an id for its logs, error
bodies and TF Serving's metadata, and replaces any other (too long, spaces, control characters that
could forge log lines) with its own; the clients refuse an invalid id before sending, so a caller
never looks for an id in the logs that the gateway did not keep.
"""

from __future__ import annotations

import re
import uuid

HEADER = "X-Request-ID"
METADATA_KEY = "x-request-id"
RULE = "1..64 characters of A-Z a-z 0-9 . _ -"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_id() -> str:
    """A fresh id, where a call has none of its own: a uuid4 in hex (32 characters, always valid)."""
    return uuid.uuid4().hex


def is_valid(value: str | None) -> bool:
    """Whether `value` is an id the gateway keeps as it is."""
    return value is not None and _VALID.fullmatch(value) is not None
