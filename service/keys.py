"""API keys: created and revoked by operators (``esgd keys``), checked on every request when required.

A key's secret (``esgd_`` + 43 URL-safe characters, 256 random bits) is shown once when it is created;
the database keeps its SHA-256 only. Keys are required when the settings say so (by default whenever the
service database is not the embedded SQLite) or as soon as any key exists. A key sees and changes its own
jobs; an admin key sees every job and the dashboard.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.tables import ApiKey, utcnow

SECRET_PREFIX = "esgd_"


@dataclass(frozen=True)
class Principal:
    """Who is asking: a key (its id), or nobody while keys are off (then everything is allowed)."""

    key_id: str | None
    admin: bool

    def may_access(self, owner: str | None) -> bool:
        return self.admin or (self.key_id is not None and owner == self.key_id)


ANONYMOUS = Principal(key_id=None, admin=True)
"""The single user of an embedded service without keys."""


class KeyNotFound(LookupError):
    """No key has that id (``esgd keys revoke`` with a wrong id)."""


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """A new key and its secret (the only time the secret exists outside the client)."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=f"key-{secrets.token_hex(6)}",
        name=name,
        secret_sha256=_sha256(secret),
        admin=admin,
        created_at=utcnow(),
    )
    session.add(key)
    session.commit()
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key at once (requests with it get 401 from now on); revoking twice keeps the first time."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyNotFound(key_id)
    session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.commit()
    session.refresh(key)
    return key


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal of an active key with this secret, or None."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 128:
        return None
    key = session.scalars(
        select(ApiKey).where(ApiKey.secret_sha256 == _sha256(secret), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    return None if key is None else Principal(key_id=key.id, admin=key.admin)


def keys_required(session: Session, settings: Settings) -> bool:
    """Whether requests need a key: the settings demand it, or an active key exists."""
    if settings.keys_required_by_settings():
        return True
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
