"""Tokens: Ed25519-signed JWTs of three kinds, recorded by ``jti`` (never the token itself).

Validation is signature + expiry + kind + not revoked, and reads only memory on the hot path:
verified tokens are cached (bounded), revocations are an in-process set kept current by the
revoking code, and "last used" times are gathered in memory and flushed in batches.

Who may mint what is decided in one place, :meth:`TokenService.mint`:
admin tokens mint any kind; a swarm token mints agent tokens for its own swarm, expiring no
later than itself; agent tokens mint nothing. Any token may be refreshed (new ``jti``, new
expiry within the maximum, never beyond the token that minted it).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import jwt
import msgspec
import structlog

from catalog.config import TokensConfig
from catalog.database import SYSTEM_SCHEMA, Database, fetch_one
from catalog.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unprocessable,
)
from catalog.identity import TOKEN_KINDS, Principal, TokenKind
from catalog.keys import SigningKey
from catalog.swarms import SwarmStore, check_swarm_name

log = structlog.get_logger(__name__)

AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
VERIFY_CACHE_SIZE = 8192


class IssuedToken(msgspec.Struct, kw_only=True):
    token: str
    jti: str
    kind: str
    swarm: str | None
    agent: str | None
    expires_at: datetime


class TokenRecord(msgspec.Struct, kw_only=True):
    jti: str
    kind: str
    swarm: str | None
    agent: str | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_by: str | None
    parent_jti: str | None


_RECORD_COLUMNS = (
    "jti, kind, swarm, agent, created_at, expires_at, revoked_at, last_used_at, created_by, parent_jti"
)


def _now() -> datetime:
    return datetime.now(UTC)


class TokenService:
    def __init__(self, db: Database, key: SigningKey, config: TokensConfig, swarms: SwarmStore) -> None:
        self._db = db
        self._key = key
        self._config = config
        self._swarms = swarms
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._last_used: dict[str, datetime] = {}
        with db.reading() as cur:
            rows = cur.execute(
                f"SELECT jti, expires_at FROM {SYSTEM_SCHEMA}.tokens "
                "WHERE revoked_at IS NOT NULL AND expires_at > ?",
                [_now()],
            ).fetchall()
        self._revoked: dict[str, datetime] = {jti: exp for jti, exp in rows}

    @property
    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return self._key.jwks()

    # --- issuing ----------------------------------------------------------------------
    def _ttl(self, ttl_seconds: int | None) -> int:
        if ttl_seconds is None:
            return min(self._config.default_ttl_seconds, self._config.max_ttl_seconds)
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
            raise InvalidArgument("ttl_seconds must be an integer number of seconds")
        if not 1 <= ttl_seconds <= self._config.max_ttl_seconds:
            raise Unprocessable(
                f"ttl_seconds must be between 1 and {self._config.max_ttl_seconds} "
                f"(the configured maximum), got {ttl_seconds}"
            )
        return ttl_seconds

    def mint(
        self,
        issuer: Principal | None,
        kind: str,
        *,
        swarm: str | None = None,
        agent: str | None = None,
        ttl_seconds: int | None = None,
    ) -> IssuedToken:
        """Issue a token on behalf of ``issuer`` (None: the local operator via the CLI)."""
        if kind not in TOKEN_KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(TOKEN_KINDS)}, got {kind!r}")
        ttl = self._ttl(ttl_seconds)
        not_after: datetime | None = None
        parent: str | None = None
        if issuer is not None and not issuer.is_admin:
            if issuer.kind != "swarm":
                raise PermissionDenied("agent tokens cannot mint tokens; ask your swarm's token or an admin")
            if kind != "agent":
                raise PermissionDenied("a swarm token may mint only agent tokens (kind 'agent')")
            swarm = swarm or issuer.swarm
            if swarm != issuer.swarm:
                raise PermissionDenied(
                    f"a swarm token of {issuer.swarm!r} may mint agent tokens only for its own swarm, "
                    f"not for {swarm!r}"
                )
            not_after = issuer.expires_at
            parent = issuer.jti
        if kind == "admin":
            if swarm is not None or agent is not None:
                raise InvalidArgument("admin tokens take neither 'swarm' nor 'agent'")
        else:
            if swarm is None:
                raise InvalidArgument(f"{kind} tokens need 'swarm'")
            check_swarm_name(swarm)
            if not self._swarms.exists(swarm):
                raise NotFound(f"swarm {swarm!r} does not exist; create it with POST /v1/swarms first")
            if kind == "agent":
                if agent is None or not AGENT_NAME_RE.match(agent):
                    raise InvalidArgument(
                        "agent tokens need 'agent': 1-128 characters of letters, digits, '_', '.', '@' "
                        "and '-', starting with a letter or digit"
                    )
            elif agent is not None:
                raise InvalidArgument("swarm tokens take no 'agent'; mint agent tokens for that")
        return self._issue(
            kind,  # type: ignore[arg-type]
            swarm=swarm,
            agent=agent,
            ttl=ttl,
            not_after=not_after,
            created_by=issuer.label if issuer else "cli",
            parent=parent,
        )

    def _issue(
        self,
        kind: TokenKind,
        *,
        swarm: str | None,
        agent: str | None,
        ttl: int,
        not_after: datetime | None,
        created_by: str,
        parent: str | None,
    ) -> IssuedToken:
        now = _now().replace(microsecond=0)
        expires = now + timedelta(seconds=ttl)
        if not_after is not None and expires > not_after:
            expires = not_after
        jti = uuid.uuid4().hex
        subject = {"admin": "admin", "swarm": f"swarm:{swarm}", "agent": f"agent:{swarm}/{agent}"}[kind]
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "sub": subject,
            "jti": jti,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            "kind": kind,
            "swarm": swarm,
            "agent": agent,
        }
        token = jwt.encode(claims, self._key.private, algorithm="EdDSA", headers={"kid": self._key.kid})
        with self._db.transaction() as cur:
            cur.execute(
                f"INSERT INTO {SYSTEM_SCHEMA}.tokens ({_RECORD_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
                [jti, kind, swarm, agent, now, expires, created_by, parent],
            )
        log.info(
            "token.issued",
            jti=jti,
            kind=kind,
            swarm=swarm,
            agent=agent,
            expires_at=expires.isoformat(),
        )
        return IssuedToken(token=token, jti=jti, kind=kind, swarm=swarm, agent=agent, expires_at=expires)

    def refresh(self, principal: Principal, ttl_seconds: int | None = None) -> IssuedToken:
        """A new token for the same identity. An agent token minted by a swarm token stays
        bounded by that swarm token's expiry, and dies with it."""
        ttl = self._ttl(ttl_seconds)
        parent: str | None = None
        not_after: datetime | None = None
        with self._db.reading() as cur:
            row = fetch_one(
                cur, f"SELECT parent_jti FROM {SYSTEM_SCHEMA}.tokens WHERE jti = ?", [principal.jti]
            )
            if row and row[0]:
                parent = row[0]
                prow = fetch_one(
                    cur,
                    f"SELECT expires_at, revoked_at FROM {SYSTEM_SCHEMA}.tokens WHERE jti = ?",
                    [parent],
                )
                if prow is None or prow[1] is not None or prow[0] <= _now():
                    raise PermissionDenied("the swarm token that minted this token is no longer valid")
                not_after = prow[0]
        return self._issue(
            principal.kind,
            swarm=principal.swarm,
            agent=principal.agent,
            ttl=ttl,
            not_after=not_after,
            created_by=principal.label,
            parent=parent,
        )

    # --- verifying --------------------------------------------------------------------
    def verify(self, token: str) -> Principal:
        """The principal for a bearer token, or :class:`Unauthenticated` saying why not."""
        cached = self._cache.get(token)
        if cached is None:
            cached = self._decode(token)
            with self._lock:
                self._cache[token] = cached
                if len(self._cache) > VERIFY_CACHE_SIZE:
                    self._cache.popitem(last=False)
        now = _now()
        if cached.expires_at + timedelta(seconds=self._config.leeway_seconds) <= now:
            raise Unauthenticated("token expired; refresh it before it expires or ask for a new one")
        if cached.jti in self._revoked:
            raise Unauthenticated("token revoked; ask for a new one")
        self._last_used[cached.jti] = now
        return cached

    def _decode(self, token: str) -> Principal:
        if not token or len(token) > 4096:
            raise Unauthenticated("malformed token")
        try:
            claims = jwt.decode(
                token,
                self._key.public,
                algorithms=["EdDSA"],
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
                options={"require": ["exp", "iat", "jti", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "token expired; refresh it before it expires or ask for a new one"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated("token algorithm not accepted: Quiver tokens are EdDSA (Ed25519)") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature invalid: not issued by this Quiver") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        kind = claims.get("kind")
        if kind not in TOKEN_KINDS:
            raise Unauthenticated("invalid token: unknown kind")
        swarm, agent = claims.get("swarm"), claims.get("agent")
        if kind != "admin" and not isinstance(swarm, str):
            raise Unauthenticated("invalid token: missing swarm")
        if kind == "agent" and not isinstance(agent, str):
            raise Unauthenticated("invalid token: missing agent")
        return Principal(
            kind=kind,
            jti=str(claims["jti"]),
            subject=str(claims["sub"]),
            expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
            swarm=swarm if kind != "admin" else None,
            agent=agent if kind == "agent" else None,
        )

    # --- revoking ---------------------------------------------------------------------
    def revoke(self, jti: str) -> TokenRecord:
        """Revoke ``jti`` and the tokens it minted; effective on the next call everywhere."""
        now = _now()
        with self._db.transaction() as cur:
            row = fetch_one(cur, f"SELECT expires_at FROM {SYSTEM_SCHEMA}.tokens WHERE jti = ?", [jti])
            if row is None:
                raise NotFound(f"no token with jti {jti!r}; GET /v1/tokens lists them")
            revoked = cur.execute(
                f"UPDATE {SYSTEM_SCHEMA}.tokens SET revoked_at = coalesce(revoked_at, ?) "
                "WHERE jti = ? OR parent_jti = ? RETURNING jti, expires_at",
                [now, jti, jti],
            ).fetchall()
        with self._lock:
            for j, exp in revoked:
                self._revoked[j] = exp
        log.info("token.revoked", jti=jti, cascade=len(revoked) - 1)
        return self.get(jti)

    def revoke_swarm(self, cur: duckdb.DuckDBPyConnection, swarm: str) -> None:
        """Revoke every token of ``swarm`` inside the caller's transaction (swarm deletion)."""
        rows = cur.execute(
            f"UPDATE {SYSTEM_SCHEMA}.tokens SET revoked_at = coalesce(revoked_at, ?) "
            "WHERE swarm = ? RETURNING jti, expires_at",
            [_now(), swarm],
        ).fetchall()
        with self._lock:
            for j, exp in rows:
                self._revoked[j] = exp

    # --- listing and bookkeeping --------------------------------------------------------
    def get(self, jti: str) -> TokenRecord:
        with self._db.reading() as cur:
            row = fetch_one(cur, f"SELECT {_RECORD_COLUMNS} FROM {SYSTEM_SCHEMA}.tokens WHERE jti = ?", [jti])
        if row is None:
            raise NotFound(f"no token with jti {jti!r}; GET /v1/tokens lists them")
        return self._record(row)

    def list(
        self, *, swarm: str | None = None, include_inactive: bool = False, limit: int = 1000
    ) -> list[TokenRecord]:
        self.flush_last_used()
        where: list[str] = []
        params: list[object] = []
        if swarm is not None:
            where.append("swarm = ?")
            params.append(swarm)
        if not include_inactive:
            where.append("revoked_at IS NULL AND expires_at > ?")
            params.append(_now())
        sql = f"SELECT {_RECORD_COLUMNS} FROM {SYSTEM_SCHEMA}.tokens"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        params.append(limit)
        with self._db.reading() as cur:
            return [self._record(r) for r in cur.execute(sql, params).fetchall()]

    @staticmethod
    def _record(row: tuple[Any, ...]) -> TokenRecord:
        names = [c.strip() for c in _RECORD_COLUMNS.split(",")]
        return TokenRecord(**dict(zip(names, row, strict=True)))

    def active(self, jti: str) -> bool:
        try:
            rec = self.get(jti)
        except NotFound:
            return False
        return rec.revoked_at is None and rec.expires_at > _now()

    def flush_last_used(self) -> int:
        """Write the gathered "last used" times in one batch; prune expired revocations."""
        with self._lock:
            batch, self._last_used = self._last_used, {}
            now = _now()
            self._revoked = {j: e for j, e in self._revoked.items() if e > now}
        if not batch:
            return 0
        with self._db.transaction() as cur:
            cur.executemany(
                f"UPDATE {SYSTEM_SCHEMA}.tokens SET last_used_at = ? WHERE jti = ?",
                [[t, j] for j, t in batch.items()],
            )
        return len(batch)
