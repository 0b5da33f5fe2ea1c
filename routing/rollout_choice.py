"""Which version of an adapter a request gets while a new one is rolled out beside it.

A request that names a `user` gets the same version every time (sticky: the user's point on [0, 100) is a hash
of the adapter, the new version and the user, so raising the percentage only moves users onto the new version);
one without is drawn at random. The percentage and the versions live in the registry's record; the user's point is
`serve.wire.user_point`, which `loraplex verify` uses too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from serve.wire import AdapterRecord, user_point, versioned_name


def choose_version(record: AdapterRecord, user: str | None, draw: Callable[[], float] = random.random) -> AdapterRecord:
    """The version of `record` this request gets: `record` itself, or the version rolled out beside it, renamed
    `NAME@vN` so engines hold both at once (`serve.wire.versioned_name`)."""
    canary = record.canary
    if canary is None:
        return record
    point = user_point(record.name, canary.version, user) if user else draw() * 100
    if point < record.canary_percent:
        return replace(canary, name=versioned_name(record.name, canary.version))
    return record
