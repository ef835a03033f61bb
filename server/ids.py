"""Ids derived from request ids, scoped to the caller's tenant.

A retried create (StartRun, Stream, CreateThread, CreateSchedule) finds what
the first attempt made through an id derived from its request_id. Tenants
derive in a namespace of their own, so two tenants may use the same
request_id; the default tenant "" keeps the plain derivation of a server
without authentication.
"""

from __future__ import annotations

import uuid

_TENANT_NAMESPACE = uuid.UUID("3d1c7e52-8f4a-4b6e-a0d9-5c2e8b7f1a36")


def derived_id(namespace: uuid.UUID, request_id: str, tenant: str = "") -> str:
    """32 hex digits derived from a request_id in `namespace`, scoped to `tenant`
    (tenant names hold no "/", so the name below is unambiguous)."""
    if not tenant:
        return uuid.uuid5(namespace, request_id).hex
    return uuid.uuid5(_TENANT_NAMESPACE, f"{namespace}/{tenant}/{request_id}").hex
