"""Tokens: mint, list, revoke, refresh, whoami.

The router takes any token but a metrics one (``TOKEN``): minting, refreshing, whoami; who
may mint what is decided by the catalog (:meth:`catalog.tokens.TokenService.mint`). Listing
and revoking need an admin token: ``guards=[ADMIN]`` on those three handlers (they share
paths with the others, so they cannot live on a router of their own)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Router, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from catalog import Catalog, Principal
from catalog.identity import WhoAmI
from catalog.tokens import IssuedToken, RevokedTokens, TokenRecord
from control_plane.context import ADMIN, TOKEN, audited
from control_plane.models import CreateToken, RefreshToken, TokenInfo, TokenList


class RevokeTokens(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Whose tokens to revoke: every token of ``swarm``, or only those of its ``agent``."""

    swarm: str
    agent: str | None = None


def _info(r: TokenRecord, now: Any) -> TokenInfo:
    return TokenInfo(**msgspec.structs.asdict(r), active=r.revoked_at is None and r.expires_at > now)


@post(
    "/v1/tokens",
    sync_to_thread=True,
    tags=["tokens"],
    summary="Mint a token (admin: any kind; swarm token: agent tokens of its swarm). Shown once.",
)
def create_token(
    request: Request[Principal, Any, Any],
    data: JSONBody[CreateToken],
    catalog: NamedDependency[Catalog],
) -> IssuedToken:
    target = "/".join(x for x in (data.kind, data.swarm, data.agent) if x)
    with audited(request, "token.create", target):
        issued = catalog.tokens.mint(
            request.user,
            data.kind,
            swarm=data.swarm,
            agent=data.agent,
            ttl_seconds=data.ttl_seconds,
            attributes=data.attributes,
        )
    catalog.metrics.tokens_issued.labels(issued.kind).inc()
    return issued


@get(
    "/v1/tokens",
    sync_to_thread=True,
    tags=["tokens"],
    summary="List tokens (never the tokens themselves)",
    guards=[ADMIN],
)
def list_tokens(
    catalog: NamedDependency[Catalog],
    swarm: FromQuery[str | None] = None,
    include_inactive: FromQuery[bool] = False,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 1000,
) -> TokenList:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    records = catalog.tokens.list(swarm=swarm, include_inactive=include_inactive, limit=limit)
    return TokenList(tokens=[_info(r, now) for r in records])


@delete(
    "/v1/tokens/{jti:str}",
    sync_to_thread=True,
    tags=["tokens"],
    status_code=200,
    summary="Revoke a token's whole chain (and the agent tokens it minted); effective on the next call",
    guards=[ADMIN],
)
def revoke_token(
    request: Request[Principal, Any, Any],
    jti: FromPath[str],
    catalog: NamedDependency[Catalog],
) -> TokenInfo:
    from datetime import UTC, datetime

    with audited(request, "token.revoke", jti[:200]):
        record = catalog.tokens.revoke(jti)
    return _info(record, datetime.now(UTC))


@post(
    "/v1/tokens/revoke",
    sync_to_thread=True,
    tags=["tokens"],
    status_code=200,
    summary="Revoke every token of one swarm, or of one agent of a swarm (chains included)",
    guards=[ADMIN],
)
def revoke_tokens(
    request: Request[Principal, Any, Any],
    data: JSONBody[RevokeTokens],
    catalog: NamedDependency[Catalog],
) -> RevokedTokens:
    target = f"{data.swarm}/{data.agent}" if data.agent is not None else data.swarm
    with audited(request, "token.revoke_all", target[:200]):
        return catalog.tokens.revoke_all(data.swarm, data.agent)


@post(
    "/v1/tokens/refresh",
    sync_to_thread=True,
    tags=["tokens"],
    summary="Rotate the caller's token: new jti, same chain, never beyond the chain's granted expiry",
)
def refresh_token(
    request: Request[Principal, Any, Any],
    catalog: NamedDependency[Catalog],
    data: JSONBody[RefreshToken | None] = None,
) -> IssuedToken:
    principal = request.user
    with audited(request, "token.refresh", principal.jti):
        issued = catalog.tokens.refresh(principal, data.ttl_seconds if data else None)
    catalog.metrics.tokens_issued.labels(issued.kind).inc()
    return issued


@get("/v1/whoami", sync_to_thread=True, tags=["tokens"], summary="Who the caller's token says it is")
def whoami(request: Request[Principal, Any, Any], catalog: NamedDependency[Catalog]) -> WhoAmI:
    return catalog.whoami(request.user)


ROUTER = Router(
    "/",
    guards=[TOKEN],
    route_handlers=[create_token, list_tokens, revoke_token, revoke_tokens, refresh_token, whoami],
)
