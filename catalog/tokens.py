"""Tokens: Ed25519-signed JWTs of four kinds (admin, swarm, agent, metrics), recorded by ``jti`` (never the token itself).

Validation is signature (by the key the token's ``kid`` header names: the active signing
key or a previous one that still verifies, catalog/keys.py) + expiry + kind + not revoked +
still the same swarm, and reads only memory on the hot path: verified tokens are cached (bounded), revocations are in-process sets
(of jtis and of chain roots) kept current by the revoking code, the swarm instance ids are
held by :class:`~catalog.swarms.SwarmStore`, and "last used" times are gathered in memory
and flushed in batches.

Who may mint what is decided in one place, :meth:`TokenService.mint`:
admin tokens mint any kind; a swarm token mints agent tokens for its own swarm, expiring no
later than itself; agent and metrics tokens mint nothing.

Lineage (proto_docs/authentication.md, "Token chains"): a minted token starts a *chain*
(claim ``root`` = its own jti); refreshing rotates a token within its chain (new ``jti``,
same ``root``) and never beyond the expiry the root was minted with, so a refresh cannot
extend what an admin granted. Revoking any token revokes its whole chain, and the chains of
the agent tokens that chain's swarm tokens minted (claim ``grant``). Tokens carry the swarm
instance they were minted for (claim ``sid``): a swarm deleted and re-created under the
same name never honours the old one's tokens. Every write runs under the catalog's one
admin-write lock (:mod:`catalog.writes`), so a mint, a refresh, a revocation and a swarm's
deletion never interleave.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import jwt
import msgspec
import structlog

from catalog.clock import SYSTEM_CLOCK, Clock, utcnow
from catalog.config import TokensConfig
from catalog.database import SYSTEM_SCHEMA, Database, fetch_one
from catalog.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuiverError,
    Unauthenticated,
    Unprocessable,
    WriteConflict,
    bounded,
)
from catalog.identity import TOKEN_KINDS, UNSCOPED_KINDS, Principal, TokenKind
from catalog.keys import KeyRing, SigningKey
from catalog.rules import AttributeValue, check_token_attributes
from catalog.swarms import SwarmStore, check_swarm_name
from catalog.writes import AdminWrites

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
    # An agent token's attributes, as the token carries them (proto_docs/governance.md).
    attributes: dict[str, AttributeValue] = msgspec.field(default_factory=dict)


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
    # The swarm token that minted this token's chain (agent tokens minted by a swarm token).
    parent_jti: str | None
    # The first token of this token's refresh chain (itself when it was minted, not refreshed).
    root_jti: str | None


class RevokedTokens(msgspec.Struct, kw_only=True):
    """What one bulk revocation did: the tokens newly revoked (their chains included)."""

    swarm: str
    agent: str | None
    revoked: int
    jtis: list[str]


_RECORD_COLUMNS = (
    "jti, kind, swarm, agent, created_at, expires_at, revoked_at, last_used_at, created_by, parent_jti, "
    "root_jti"
)
_REVOKED_MESSAGE = "token revoked; ask for a new one"
# The tokens of the chains rooted in ``$roots``, and of the chains their tokens minted.
_CHAIN_MEMBERS = (
    f"root_jti IN (SELECT unnest($roots)) OR parent_jti IN "
    f"(SELECT jti FROM {SYSTEM_SCHEMA}.tokens WHERE root_jti IN (SELECT unnest($roots)))"
)
# Why SELECT, then UPDATE without RETURNING: DuckDB (2.0.1) does not detect a write-write
# conflict for UPDATE … RETURNING on a table with a primary key (tokens has one) -- both
# transactions commit and one update is lost -- while a plain UPDATE raises the conflict
# that AdminWrites retries (tests/test_admin_races.py provokes one).


_EXPIRED_MESSAGE = "token expired; refresh it before it expires or ask for a new one"

#: The private claim an agent token's attributes travel in (a flat JSON object).
ATTRIBUTES_CLAIM = "qattr"


def _attributes_claim(raw: object, kind: str) -> tuple[tuple[str, AttributeValue], ...]:
    """The attributes of a verified token's claim as :class:`Principal` holds them (sorted
    pairs). Only Quiver signs tokens, so a malformed claim is a token that is not Quiver's."""
    if raw is None:
        return ()
    if kind != "agent":
        raise Unauthenticated("invalid token: attributes on a token that is not an agent token")
    try:
        return check_token_attributes(raw)
    except QuiverError:
        raise Unauthenticated("invalid token: malformed attributes claim") from None


def bearer_token(values: Sequence[str]) -> str:
    """The token of a request's ``authorization`` headers (all of them, in order), as every
    listener reads it: exactly one header, ``Bearer <token>``. Several are refused whichever
    of them is valid — which one counts would be a guess (a client's extra metadata, a proxy
    adding its own), and the listeners would not guess alike (proto_docs/authentication.md)."""
    if not values or (len(values) == 1 and not values[0].strip()):
        raise Unauthenticated("missing token: send the header 'authorization: Bearer <token>'")
    if len(values) > 1:
        raise Unauthenticated(
            f"several authorization headers ({len(values)}): send exactly one 'authorization: Bearer <token>'"
        )
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization header: use 'Bearer <token>'")
    return token.strip()


def _int_claim(claims: dict[str, Any], name: str, what: str) -> int:
    """A NumericDate claim as PyJWT reads it (an integer, or what ``int()`` accepts)."""
    try:
        return int(claims[name])
    except (ValueError, TypeError, OverflowError):
        raise Unauthenticated(f"invalid token: {what} claim ({name}) must be an integer.") from None


class TokenService:
    """Mints, verifies, refreshes and revokes tokens. ``clock`` is the one source of time for
    all of it (catalog/clock.py): the ``iat``/``exp`` a token is signed with, the expiry
    check when it is presented, a refresh's clamp, the revocation and last-use times."""

    def __init__(
        self,
        db: Database,
        keys: KeyRing,
        config: TokensConfig,
        swarms: SwarmStore,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        self._db = db
        self._keys = keys
        self._config = config
        self._swarms = swarms
        self._writes: AdminWrites = swarms.writes
        self._lock = threading.Lock()
        #: Verified tokens: the principal and the moment (epoch seconds) it is refused from.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        #: jti -> when it was last used (epoch seconds: a float per request, the datetime is
        #: made by the batched write).
        self._last_used: dict[str, float] = {}
        now = self._now()
        with self._writes.lock, db.reading() as cur:
            revoked = cur.execute(
                f"SELECT jti, root_jti, expires_at FROM {SYSTEM_SCHEMA}.tokens "
                "WHERE revoked_at IS NOT NULL AND expires_at > ?",
                [now],
            ).fetchall()
            legacy = cur.execute(
                f"SELECT jti, swarm_id FROM {SYSTEM_SCHEMA}.tokens "
                "WHERE legacy AND revoked_at IS NULL AND expires_at > ?",
                [now],
            ).fetchall()
        # jti -> expiry, and chain root -> latest expiry in the chain (pruned once expired).
        self._revoked: dict[str, datetime] = {}
        self._revoked_roots: dict[str, datetime] = {}
        self._apply_revocations([(j, r, e) for j, r, e in revoked])
        # Tokens issued before lineage claims existed: jti -> the swarm instance they belong to.
        self._legacy: dict[str, str | None] = {j: sid for j, sid in legacy}

    def _now(self) -> datetime:
        return utcnow(self._clock)

    def _expired(self, expires_at: datetime, now: datetime | None = None) -> bool:
        """Whether a token expiring at ``expires_at`` is refused now: PyJWT's rule (``exp <=
        now - leeway``) on this service's clock."""
        leeway = timedelta(seconds=self._config.leeway_seconds)
        return expires_at + leeway <= (now or self._now())

    @property
    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return self._keys.jwks()

    # --- signing keys (catalog/keys.py) ------------------------------------------------
    def signed_by_active_key(self, token: str) -> bool:
        """Whether ``token``'s header names the key that signs new tokens (no verification:
        used to re-sign the admin token after a rotation, before the old key retires)."""
        try:
            return jwt.get_unverified_header(token).get("kid") == self._keys.active.kid
        except jwt.PyJWTError:
            return False

    def rotate_signing_key(self, *, retire_previous: bool = False) -> SigningKey:
        """Sign new tokens with a new key; the current key keeps verifying until the last
        unrevoked token it signed expires (``retire_previous``: no previous key verifies any
        more). Under the admin-write lock, so no token is minted halfway through; the caller
        guarantees no other process signs with this data directory's key (it holds the
        database)."""
        with self._writes.lock, self._db.reading() as cur:
            row = fetch_one(
                cur, f"SELECT max(expires_at) FROM {SYSTEM_SCHEMA}.tokens WHERE revoked_at IS NULL"
            )
            last = row[0] if row else None
            key = self._keys.rotate(last, retire_previous=retire_previous)
            if retire_previous:
                with self._lock:
                    self._cache.clear()  # verified tokens of the retired keys
            return key

    def retire_keys(self, now: datetime | None = None) -> list[str]:
        """Drop the previous signing keys whose last token has expired (housekeeping). A
        retired key verifies nothing more, so the verified-token cache goes too (as after
        :meth:`rotate_signing_key` with ``retire_previous``): what it held is checked afresh."""
        retired = self._keys.retire_expired(now or self._now(), self._config.leeway_seconds)
        if retired:
            with self._lock:
                self._cache.clear()
        return retired

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
        attributes: object = None,
    ) -> IssuedToken:
        """Issue a token on behalf of ``issuer`` (None: the local operator via the CLI).

        ``attributes`` (agent tokens only) are carried in the token, bound into row filters
        (proto_docs/governance.md, "Rules and attributes"). A swarm token may give them to the
        agent tokens it mints: it already reads everything its allowlist grants, and an
        attribute can only narrow a row filter's view or move it within that grant."""
        if kind not in TOKEN_KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(TOKEN_KINDS)}, got {kind!r}")
        ttl = self._ttl(ttl_seconds)
        held: tuple[tuple[str, AttributeValue], ...] = ()
        if attributes is not None:
            if kind != "agent":
                raise Unprocessable(
                    f"attributes are for agent tokens; a {kind} token carries none (a swarm's own "
                    "attributes are set with PUT /v1/swarms/{name}/attributes)"
                )
            held = check_token_attributes(attributes)
        not_after: datetime | None = None
        parent: str | None = None
        grant: str | None = None
        if issuer is not None and not issuer.is_admin:
            if issuer.kind != "swarm":
                raise PermissionDenied(
                    f"{issuer.kind} tokens cannot mint tokens; ask your swarm's token or an admin"
                )
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
            grant = issuer.root
        _check_scope(kind, swarm, agent)
        with self._writes.lock:
            # Under the lock a swarm cannot be deleted, nor the issuer revoked, halfway through.
            swarm_id: str | None = None
            if swarm is not None:
                swarm_id = self._swarms.instance(swarm)
                if swarm_id is None:
                    raise NotFound(f"swarm {swarm!r} does not exist; create it with POST /v1/swarms first")
            if issuer is not None:
                self._check_live(issuer)
            return self._issue(
                kind,
                swarm=swarm,
                agent=agent,
                swarm_id=swarm_id,
                ttl=ttl,
                not_after=not_after,
                created_by=issuer.label if issuer else "cli",
                parent=parent,
                root=None,
                grant=grant,
                attributes=held,
            )

    def _issue(  # noqa: PLR0913  the token record's columns, keyword-only
        self,
        kind: TokenKind,
        *,
        swarm: str | None,
        agent: str | None,
        swarm_id: str | None,
        ttl: int,
        not_after: datetime | None,
        created_by: str,
        parent: str | None,
        root: str | None,
        grant: str | None,
        attributes: tuple[tuple[str, AttributeValue], ...] = (),
    ) -> IssuedToken:
        """Sign and record one token (``root`` None: it starts a chain of its own)."""
        now = self._now().replace(microsecond=0)
        expires = now + timedelta(seconds=ttl)
        if not_after is not None and expires > not_after:
            expires = not_after
        jti = uuid.uuid4().hex
        root = root or jti
        subject = {
            "admin": "admin",
            "metrics": "metrics",
            "swarm": f"swarm:{swarm}",
            "agent": f"agent:{swarm}/{agent}",
        }[kind]
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "sub": subject,
            "jti": jti,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            "kind": kind,
            "swarm": swarm,
            "agent": agent,
            "root": root,
            "sid": swarm_id,
        }
        if grant is not None:
            claims["grant"] = grant
        if attributes:
            claims[ATTRIBUTES_CLAIM] = dict(attributes)
        key = self._keys.active
        token = jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})

        def write(cur: duckdb.DuckDBPyConnection) -> None:
            cur.execute(
                f"INSERT INTO {SYSTEM_SCHEMA}.tokens ({_RECORD_COLUMNS}, swarm_id, legacy) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, false)",
                [jti, kind, swarm, agent, now, expires, created_by, parent, root, swarm_id],
            )

        self._writes.run(f"issue a {kind} token", write)
        log.info(
            "token.issued",
            jti=jti,
            root=root,
            kind=kind,
            swarm=swarm,
            agent=agent,
            expires_at=expires.isoformat(),
        )
        return IssuedToken(
            token=token,
            jti=jti,
            kind=kind,
            swarm=swarm,
            agent=agent,
            expires_at=expires,
            attributes=dict(attributes),
        )

    def refresh(self, principal: Principal, ttl_seconds: int | None = None) -> IssuedToken:
        """Rotate the caller's token: a new ``jti`` in the same chain, expiring after
        ``ttl_seconds`` (default ``[tokens] default_ttl_seconds``) but never after the expiry
        the chain's root was minted with -- a refresh never extends what an admin granted."""
        ttl = self._ttl(ttl_seconds)
        root = principal.root or principal.jti
        with self._writes.lock:
            self._check_live(principal)
            with self._db.reading() as cur:
                row = fetch_one(
                    cur,
                    f"SELECT t.parent_jti, r.expires_at FROM {SYSTEM_SCHEMA}.tokens AS t "
                    f"JOIN {SYSTEM_SCHEMA}.tokens AS r ON r.jti = coalesce(t.root_jti, t.jti) "
                    "WHERE t.jti = ?",
                    [principal.jti],
                )
            if row is None:  # signed by us but not recorded: a restored older backup
                raise Unauthenticated("token unknown to this Quiver; ask for a new one")
            parent, granted_until = row
            return self._issue(
                principal.kind,
                swarm=principal.swarm,
                agent=principal.agent,
                swarm_id=principal.swarm_id,
                ttl=ttl,
                not_after=granted_until,
                created_by=principal.label,
                parent=parent,
                root=root,
                grant=principal.grant,
                # Exactly the attributes the chain was minted with: a refresh takes none.
                attributes=principal.attributes,
            )

    # --- verifying --------------------------------------------------------------------
    def verify(self, token: str) -> Principal:
        """The principal for a bearer token presented with a request, or
        :class:`Unauthenticated` saying why not; the token is marked used. A listener whose
        route refuses some valid tokens (admin-only routes) calls :meth:`check` and, once
        the request is accepted, :meth:`record_use` instead."""
        principal = self.check(token)
        self.record_use(principal)
        return principal

    def check(self, token: str) -> Principal:
        """Like :meth:`verify`, without marking the token used (memory only)."""
        cached = self._cache.get(token)
        if cached is None:
            principal = self._decode(token)
            # :meth:`_expired`'s rule as one number, so that every call after the first
            # compares two floats (it ran on every RPC, twice per query, building a timedelta
            # and a datetime each time): refused from ``exp + leeway`` on.
            cached = (principal, principal.expires_at.timestamp() + self._config.leeway_seconds)
            with self._lock:
                self._cache[token] = cached
                if len(self._cache) > VERIFY_CACHE_SIZE:
                    self._cache.popitem(last=False)
        principal, refused_from = cached
        if refused_from <= self._clock.time():
            raise Unauthenticated(_EXPIRED_MESSAGE)
        self._check_live(principal)
        return principal

    def _check_live(self, principal: Principal) -> None:
        """Not revoked (itself, its chain, the chain that minted it) and its swarm the same
        instance it was minted for."""
        if (
            principal.jti in self._revoked
            or principal.root in self._revoked_roots
            or (principal.grant is not None and principal.grant in self._revoked_roots)
        ):
            raise Unauthenticated(_REVOKED_MESSAGE)
        if principal.swarm is not None and (
            principal.swarm_id is None or self._swarms.instance(principal.swarm) != principal.swarm_id
        ):
            raise Unauthenticated(
                f"token of a deleted swarm: swarm {principal.swarm!r} was deleted after this token "
                "was issued (a swarm of that name now is another swarm); ask for a new token"
            )

    def record_use(self, principal: Principal) -> None:
        """Note that ``principal``'s token was used for an accepted request (memory only;
        :meth:`flush_last_used` writes the times in batches)."""
        self._last_used[principal.jti] = self._clock.time()

    def _decode(self, token: str) -> Principal:
        if not token or len(token) > 4096:
            raise Unauthenticated("malformed token")
        try:
            # The header's kid selects the key: the active one, or a previous one that still
            # verifies the tokens it signed before a rotation. A token without kid is tried
            # against the active key (Quiver always sets it).
            kid = jwt.get_unverified_header(token).get("kid")
            public = self._keys.public_key(kid) if isinstance(kid, str) else self._keys.active.public
            if public is None:
                raise Unauthenticated(
                    "token signed by a key this Quiver does not hold: a retired signing key, or not "
                    "issued by this Quiver; ask for a new one"
                )
            claims = jwt.decode(
                token,
                public,
                algorithms=["EdDSA"],
                issuer=self._config.issuer,
                # The times are checked below on this service's clock, not PyJWT's own.
                options={
                    "require": ["exp", "iat", "jti", "sub", "iss"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated("token algorithm not accepted: Quiver tokens are EdDSA (Ed25519)") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature invalid: not issued by this Quiver") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        expires_at = self._check_times(claims)
        kind = claims.get("kind")
        if kind not in TOKEN_KINDS:
            raise Unauthenticated("invalid token: unknown kind")
        swarm, agent = claims.get("swarm"), claims.get("agent")
        scoped = kind not in UNSCOPED_KINDS
        if scoped and not isinstance(swarm, str):
            raise Unauthenticated("invalid token: missing swarm")
        if kind == "agent" and not isinstance(agent, str):
            raise Unauthenticated("invalid token: missing agent")
        jti = str(claims["jti"])
        root, grant, sid = claims.get("root"), claims.get("grant"), claims.get("sid")
        if root is None:
            # Issued before lineage claims: its own chain, its swarm instance as recorded.
            root, grant, sid = jti, None, self._legacy.get(jti)
        if not isinstance(root, str) or not (grant is None or isinstance(grant, str)):
            raise Unauthenticated("invalid token: malformed lineage claims")
        if scoped and not isinstance(sid, str):
            raise Unauthenticated("invalid token: missing swarm instance")
        attributes = _attributes_claim(claims.get(ATTRIBUTES_CLAIM), kind)
        return Principal(
            kind=kind,
            jti=jti,
            subject=str(claims["sub"]),
            expires_at=expires_at,
            swarm=swarm if scoped else None,
            agent=agent if kind == "agent" else None,
            root=root,
            grant=grant,
            swarm_id=sid if scoped else None,
            attributes=attributes,
        )

    def _check_times(self, claims: dict[str, Any]) -> datetime:
        """PyJWT's time checks, with the same leeway and messages, read on this service's
        clock: not yet valid when ``iat`` (or ``nbf``) is more than the leeway ahead, expired
        when ``exp`` is not after now minus the leeway. Returns the expiry."""
        current = self._now()
        now, leeway = current.timestamp(), self._config.leeway_seconds
        if _int_claim(claims, "iat", "Issued At") > now + leeway:
            raise Unauthenticated("invalid token: The token is not yet valid (iat)")
        if "nbf" in claims and _int_claim(claims, "nbf", "Not Before") > now + leeway:
            raise Unauthenticated("invalid token: The token is not yet valid (nbf)")
        exp = _int_claim(claims, "exp", "Expiration Time")
        try:
            expires_at = datetime.fromtimestamp(exp, UTC)
        except (OverflowError, OSError, ValueError):
            raise Unauthenticated("invalid token: Expiration Time claim (exp) out of range") from None
        if self._expired(expires_at, current):
            raise Unauthenticated(_EXPIRED_MESSAGE)
        return expires_at

    # --- revoking ---------------------------------------------------------------------
    def _apply_revocations(self, rows: list[tuple[str, str | None, datetime]]) -> None:
        """Make committed revocations effective on the next call (memory; caller holds the
        admin-write lock, or is the constructor)."""
        with self._lock:
            revoked = dict(self._revoked)
            roots = dict(self._revoked_roots)
            for jti, root, expires in rows:
                revoked[jti] = expires
                key = root or jti
                if key not in roots or roots[key] < expires:
                    roots[key] = expires
            self._revoked, self._revoked_roots = revoked, roots

    def _revoke_chains(self, cur: duckdb.DuckDBPyConnection, roots: list[str], now: datetime) -> list[Any]:
        """Revoke the chains rooted in ``roots``; return each member as (jti, root, expires,
        revoked_at after the update)."""
        if not roots:
            return []
        params = {"now": now, "roots": roots}
        members = cur.execute(
            f"SELECT jti, root_jti, expires_at, coalesce(revoked_at, $now) FROM {SYSTEM_SCHEMA}.tokens "
            f"WHERE {_CHAIN_MEMBERS}",
            params,
        ).fetchall()
        cur.execute(
            f"UPDATE {SYSTEM_SCHEMA}.tokens SET revoked_at = $now WHERE revoked_at IS NULL AND ({_CHAIN_MEMBERS})",
            params,
        )
        return members

    def revoke(self, jti: str) -> TokenRecord:
        """Revoke ``jti``'s whole chain and the chains its tokens minted; effective on the
        next call on both listeners. Revoking a revoked token changes nothing (idempotent)."""
        now = self._now()

        def write(cur: duckdb.DuckDBPyConnection) -> list[Any]:
            row = fetch_one(
                cur, f"SELECT coalesce(root_jti, jti) FROM {SYSTEM_SCHEMA}.tokens WHERE jti = ?", [jti]
            )
            if row is None:
                raise NotFound(f"no token with jti {bounded(jti)!r}; GET /v1/tokens lists them")
            return self._revoke_chains(cur, [row[0]], now)

        with self._writes.lock:
            rows = self._writes.run("revoke a token", write)
            self._apply_revocations([(j, r, e) for j, r, e, _ in rows])
        log.info("token.revoked", jti=jti, revoked=sum(1 for *_, at in rows if at == now))
        return self.get(jti)

    def revoke_all(self, swarm: str, agent: str | None = None) -> RevokedTokens:
        """Revoke every token of one swarm, or of one agent of a swarm (chains included)."""
        check_swarm_name(swarm)
        if agent is not None and not AGENT_NAME_RE.match(agent):
            raise InvalidArgument(
                "'agent' must be an agent name: 1-128 characters of letters, digits, '_', '.', '@' and '-'"
            )
        now = self._now()
        where = "swarm = ?" + (" AND agent = ?" if agent is not None else "")
        params: list[object] = [swarm] if agent is None else [swarm, agent]

        def write(cur: duckdb.DuckDBPyConnection) -> list[Any]:
            roots = [
                r[0]
                for r in cur.execute(
                    f"SELECT DISTINCT coalesce(root_jti, jti) FROM {SYSTEM_SCHEMA}.tokens WHERE {where}",
                    params,
                ).fetchall()
            ]
            if not roots:
                if agent is None and self._swarms.exists(swarm):
                    return []  # a swarm without tokens: nothing to revoke
                who = f"agent {agent!r} of swarm {swarm!r}" if agent is not None else f"swarm {swarm!r}"
                raise NotFound(f"no token of {who} was ever issued; GET /v1/tokens?swarm=... lists them")
            return self._revoke_chains(cur, roots, now)

        with self._writes.lock:
            rows = self._writes.run("revoke tokens", write)
            self._apply_revocations([(j, r, e) for j, r, e, _ in rows])
        fresh = sorted(j for j, _, _, at in rows if at == now)
        log.info("token.revoked_all", swarm=swarm, agent=agent, revoked=len(fresh))
        return RevokedTokens(swarm=swarm, agent=agent, revoked=len(fresh), jtis=fresh)

    def revoke_swarm(self, cur: duckdb.DuckDBPyConnection, swarm: str) -> Callable[[], None]:
        """Revoke every token of ``swarm`` inside the caller's transaction (swarm deletion);
        return what makes it effective in memory, to call once the transaction committed."""
        rows = cur.execute(
            f"SELECT jti, root_jti, expires_at FROM {SYSTEM_SCHEMA}.tokens WHERE swarm = ?", [swarm]
        ).fetchall()
        cur.execute(
            f"UPDATE {SYSTEM_SCHEMA}.tokens SET revoked_at = ? WHERE swarm = ? AND revoked_at IS NULL",
            [self._now(), swarm],
        )
        return lambda: self._apply_revocations([(j, r, e) for j, r, e in rows])

    # --- listing and bookkeeping --------------------------------------------------------
    def get(self, jti: str) -> TokenRecord:
        with self._db.reading() as cur:
            row = fetch_one(cur, f"SELECT {_RECORD_COLUMNS} FROM {SYSTEM_SCHEMA}.tokens WHERE jti = ?", [jti])
        if row is None:
            raise NotFound(f"no token with jti {bounded(jti)!r}; GET /v1/tokens lists them")
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
            params.append(self._now())
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
        return rec.revoked_at is None and rec.expires_at > self._now()

    def flush_last_used(self) -> int:
        """Write the gathered "last used" times in one batch (under the admin-write lock: a
        revocation updates the same rows); prune expired revocations."""
        with self._lock:
            batch, self._last_used = self._last_used, {}
            now = self._now()
            self._revoked = {j: e for j, e in self._revoked.items() if e > now}
            self._revoked_roots = {r: e for r, e in self._revoked_roots.items() if e > now}
            self._legacy = {j: s for j, s in self._legacy.items() if j not in self._revoked}
        if not batch:
            return 0
        params = [[datetime.fromtimestamp(t, UTC), j] for j, t in batch.items()]
        try:
            self._writes.run(
                "record token use",
                lambda cur: cur.executemany(
                    f"UPDATE {SYSTEM_SCHEMA}.tokens SET last_used_at = ? WHERE jti = ?", params
                ),
            )
        except WriteConflict:
            with self._lock:  # keep the times for the next flush (newer ones win)
                for jti, t in batch.items():
                    if jti not in self._last_used:
                        self._last_used[jti] = t
            raise
        return len(batch)


def _check_scope(kind: str, swarm: str | None, agent: str | None) -> None:
    """That a token of ``kind`` names exactly the swarm and agent its kind is scoped to
    (admin and metrics tokens: neither; swarm: a swarm; agent: both), well formed."""
    if kind in UNSCOPED_KINDS:
        if swarm is not None or agent is not None:
            raise InvalidArgument(f"{kind} tokens take neither 'swarm' nor 'agent'")
        return
    if swarm is None:
        raise InvalidArgument(f"{kind} tokens need 'swarm'")
    check_swarm_name(swarm)
    if kind == "agent":
        if agent is None or not AGENT_NAME_RE.match(agent):
            raise InvalidArgument(
                "agent tokens need 'agent': 1-128 characters of letters, digits, '_', '.', '@' "
                "and '-', starting with a letter or digit"
            )
    elif agent is not None:
        raise InvalidArgument("swarm tokens take no 'agent'; mint agent tokens for that")
