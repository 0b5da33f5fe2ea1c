"""What of an adapter record a key may see: admins all of it; other keys only what they may use.

An unusable record's reason can name a host path, a bucket or the S3 endpoint, and a composite's components may be
adapters of other tenants (their names, weights and content hashes). The adapter listing, a card and the console's
rows all pass records through `seen_by` first; sources are left out by the card and the row themselves.
"""

from __future__ import annotations

from dataclasses import replace

from routing.principals import Principal
from serve.wire import AdapterRecord, Composition

WITHHELD_REASON = "cannot be served (an admin key sees why)"
"""An unusable record's reason, as keys without the admin scope see it."""


def seen_by(record: AdapterRecord, key: Principal) -> AdapterRecord:
    """`record` as `key` may see it: whole for admins; for other keys without the unusable reason, and with only
    the components of a composite that the key may use."""
    if key.admin or (record.unusable is None and record.composition is None and record.canary is None):
        return record
    return replace(
        record,
        unusable=WITHHELD_REASON if record.unusable is not None else None,
        composition=_in_scope(record.composition, key),
        canary=seen_by(record.canary, key) if record.canary is not None else None,
    )


def _in_scope(composition: Composition | None, key: Principal) -> Composition | None:
    """`composition` with only the components `key` may use (names, weights and the hashes they were built from)."""
    if composition is None:
        return None
    kept = [i for i, name in enumerate(composition.adapters) if key.may_use(name)]
    if len(kept) == len(composition.adapters):
        return composition
    built = composition.built_from
    return replace(
        composition,
        adapters=tuple(composition.adapters[i] for i in kept),
        weights=tuple(composition.weights[i] for i in kept),
        built_from=tuple(built[i] for i in kept) if len(built) == len(composition.adapters) else (),
    )
