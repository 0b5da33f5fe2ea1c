"""Authentication and scope as typed FastAPI dependencies: `KeyDep` for API routes, `RegisterAdmin` for writes.

A key arrives as `Authorization: Bearer lpx-...` (or `x-api-key: lpx-...`, as Anthropic's SDK sends it); a
missing or unknown key is 401, a known key asking for something outside its scope 403. `/health` takes no key;
`/metrics` one with the metrics scope.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from routing.audit import AuditAction
from routing.context import ContextDep
from routing.errors import PermissionDenied
from routing.principals import Principal


async def require_key(request: Request, context: ContextDep) -> Principal:
    """The request's principal; 401 without a valid key (unless the server is open).

    Async so FastAPI runs it on the event loop rather than sending every request through its thread pool.
    """
    return context.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))


KeyDep = Annotated[Principal, Depends(require_key)]


class RequireAdmin:
    """A dependency refusing adapter writes to keys without the admin scope, and auditing the refusal.

    It runs before the body is parsed, so a key without the scope learns nothing from validation errors.
    """

    def __init__(self, action: AuditAction) -> None:
        self.action = action

    async def __call__(self, request: Request, principal: KeyDep, context: ContextDep) -> Principal:
        try:
            principal.require_admin()
        except PermissionDenied as exc:
            context.audit.record(
                principal.name, self.action, request, adapter=request.path_params.get("name"), error=exc
            )
            raise
        return principal


RegisterAdmin = Annotated[Principal, Depends(RequireAdmin("register"))]
UnregisterAdmin = Annotated[Principal, Depends(RequireAdmin("unregister"))]
