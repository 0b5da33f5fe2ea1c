"""Read routes (`/v1/models`, `/v1/adapters`, `/v1/console/*`, `/metrics`) under the key's request rate.

They generate nothing, but each costs the router work on the event loop that relays streams (listings, the
registry's replica reports), so a key's `rpm` counts them as it counts generation requests: 429 past it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from routing.auth import KeyDep
from routing.context import ContextDep
from routing.principals import Principal


async def require_read_key(key: KeyDep, context: ContextDep) -> Principal:
    """The request's principal, once its read is admitted against its `rpm`."""
    await context.admitter.admit_read(key)
    return key


ReadKeyDep = Annotated[Principal, Depends(require_read_key)]
"""`KeyDep` for read routes: authenticated, then counted against the key's requests per minute."""
