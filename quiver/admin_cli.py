"""``quiver admin``: the control plane's admin routes from a shell, for admins who would
otherwise script curl and jq.

    quiver admin swarms list | create NAME [--description D] [--table T]... | delete NAME
    quiver admin allowlist get SWARM | set SWARM TABLE... (--clear for an empty list)
    quiver admin attributes get SWARM | set SWARM NAME=VALUE... (--clear to remove them all)
    quiver admin tokens list [--swarm S] [--all] | create --kind K [--swarm S] [--agent A] [--ttl N]
                                                          [--attribute NAME=VALUE]...

A TABLE is a pattern ('schema.table', 'schema.*') or an entry with rules written as a JSON
object ('{"table": "demo.customers", "row_filter": "country = :country"}'); a VALUE is a string,
or a number written NAME:=VALUE (proto_docs/governance.md, "Rules and attributes").
    quiver admin tokens revoke JTI | revoke --swarm S [--agent A]

Every command talks to this data directory's running server through quiver/local_client.py
(lock check, identity check, TLS, the admin token read afresh), or, given both ``--url`` and
``--token-file``, to that server with that token (a remote Quiver); it prints a readable
table, or the route's JSON with ``--json``. Exit codes: 0 done, 1 refused (by the server, or no
server of this data directory runs), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from catalog import Config, Unavailable
from catalog.identity import TOKEN_KINDS
from quiver.local_client import LocalServer, explicit_target, path_segment, running_server

Handler = Callable[[LocalServer, argparse.Namespace], Any]


def _common(p: argparse.ArgumentParser, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    config_args(p)
    p.add_argument(
        "--url", help="control plane URL (default: from the config); with --token-file, any Quiver's"
    )
    p.add_argument("--token-file", help="admin token (default: DATA_DIR/admin.token)")
    p.add_argument("--json", action="store_true", help="print the route's JSON instead of a table")


def add_parser(sub: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "admin",
        help="swarms, allowlists and tokens through the running server's control plane",
        description="Admin routes of the running server's control plane (needs `quiver serve` for "
        "this data directory; reads DATA_DIR/admin.token). Exit codes: 0 done, 1 refused, 2 usage.",
    )
    asub = p.add_subparsers(dest="admin_area", required=True)

    swarms = asub.add_parser("swarms", help="list, create and delete swarms")
    ssub = swarms.add_subparsers(dest="admin_command", required=True)
    _common(ssub.add_parser("list", help="every swarm with its allowlist (GET /v1/swarms)"), config_args)
    create = ssub.add_parser("create", help="create a swarm (POST /v1/swarms)")
    _common(create, config_args)
    create.add_argument("name", help="1-63 characters of a-z, 0-9, '_' and '-'")
    create.add_argument("--description", default="")
    create.add_argument(
        "--table",
        action="append",
        dest="tables",
        type=allowlist_entry,
        default=[],
        help="allowlist entry, 'schema.table', 'schema.*' or a JSON object with rules (repeatable)",
    )  # fmt: skip
    delete = ssub.add_parser(
        "delete", help="delete a swarm and its allowlist, revoking all its tokens (DELETE /v1/swarms/NAME)"
    )
    _common(delete, config_args)
    delete.add_argument("name")

    _get_set(
        asub,
        config_args,
        "allowlist",
        (
            "a swarm's table allowlist",
            "the patterns and the tables they match now",
            "replace the allowlist (PUT /v1/swarms/SWARM/allowlist)",
        ),
        dest="tables",
        values=dict(
            type=allowlist_entry,
            metavar="TABLE",
            help="'schema.table', 'schema.*', or a JSON object with rules: '{\"table\": \"demo.customers\", "
            '"row_filter": "country = :country", "mask": {"email": "hash"}}\'',
        ),
        clear_help="set an empty allowlist (no TABLE given)",
    )
    _get_set(
        asub,
        config_args,
        "attributes",
        (
            "a swarm's attributes, bound into its row filters",
            "the swarm's attributes (GET /v1/swarms/SWARM/attributes)",
            "replace them (PUT /v1/swarms/SWARM/attributes)",
        ),
        dest="attributes",
        values=dict(type=attribute, metavar="NAME=VALUE", help="a string; NAME:=VALUE for a number"),
        clear_help="remove every attribute (no NAME=VALUE given)",
    )

    tokens = asub.add_parser("tokens", help="list, mint and revoke tokens")
    tsub = tokens.add_subparsers(dest="admin_command", required=True)
    tlist = tsub.add_parser("list", help="token records, never the tokens (GET /v1/tokens)")
    _common(tlist, config_args)
    tlist.add_argument("--swarm", help="only this swarm's tokens")
    tlist.add_argument("--all", action="store_true", help="include revoked and expired tokens")
    tlist.add_argument("--limit", type=int, default=1000, help="at most this many (1-10000)")
    tcreate = tsub.add_parser(
        "create", help="mint a token (POST /v1/tokens): the token on stdout, its record on stderr"
    )
    _common(tcreate, config_args)
    tcreate.add_argument(
        "--kind", required=True, choices=list(TOKEN_KINDS), help="metrics: reads /metrics only"
    )
    tcreate.add_argument("--swarm")
    tcreate.add_argument("--agent")
    tcreate.add_argument("--ttl", type=int, dest="ttl_seconds", help="lifetime in seconds")
    tcreate.add_argument(
        "--attribute",
        action="append",
        type=attribute,
        dest="attributes",
        metavar="NAME=VALUE",
        help="an agent token's attribute (repeatable; NAME:=VALUE for a number)",
    )
    revoke = tsub.add_parser(
        "revoke",
        help="revoke one token's chain by jti (DELETE /v1/tokens/JTI), or every token of a swarm "
        "or of one of its agents with --swarm [--agent] (POST /v1/tokens/revoke)",
    )
    _common(revoke, config_args)
    revoke.add_argument("jti", nargs="?")
    revoke.add_argument("--swarm")
    revoke.add_argument("--agent")


def _get_set(
    asub: Any,
    config_args: Callable[[argparse.ArgumentParser], None],
    area: str,
    helps: tuple[str, str, str],
    *,
    dest: str,
    values: dict[str, Any],
    clear_help: str,
) -> None:
    """An area that is one replaceable list of a swarm (its allowlist, its attributes):
    ``get SWARM`` and ``set SWARM VALUE... | --clear`` (the pair checked by :func:`_usage_problem`).
    ``helps``: the area's, get's and set's help lines."""
    help_text, get_help, set_help = helps
    parser = asub.add_parser(area, help=help_text)
    commands = parser.add_subparsers(dest="admin_command", required=True)
    get = commands.add_parser("get", help=get_help)
    _common(get, config_args)
    get.add_argument("swarm")
    put = commands.add_parser("set", help=set_help)
    _common(put, config_args)
    put.add_argument("swarm")
    put.add_argument(dest, nargs="*", **values)
    put.add_argument("--clear", action="store_true", help=clear_help)


# --- arguments -----------------------------------------------------------------------------------


def allowlist_entry(text: str) -> str | dict[str, Any]:
    """A TABLE argument: a pattern as it is, or a JSON object (an entry with rules), which the
    server validates; anything else that starts like JSON is a usage error here."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"an entry with rules must be a JSON object: {e}") from None
    if not isinstance(entry, dict):
        raise argparse.ArgumentTypeError("an entry with rules must be a JSON object")
    return entry


def attribute(text: str) -> tuple[str, str | int | float]:
    """NAME=VALUE (a string) or NAME:=VALUE (a JSON number); the server checks the rest."""
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not NAME=VALUE")
    if not name.endswith(":"):
        return name, value
    try:
        number = json.loads(value)
    except json.JSONDecodeError:
        number = None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise argparse.ArgumentTypeError(f"{name[:-1][:60]}:= takes a number, got {value[:60]!r}")
    return name[:-1], number


# --- output -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _when(value: str | None) -> str | None:
    """An ISO timestamp cut to the second, for a table."""
    return value[:19].replace("T", " ") if value else None


def _swarm_rows(swarms: list[dict[str, Any]]) -> str:
    rows = [
        (s["name"], _when(s["created_at"]), ",".join(s["tables"]) or None, s["description"] or None)
        for s in swarms
    ]
    return table(["name", "created", "tables", "description"], rows)


def _allowlist(out: dict[str, Any]) -> str:
    lines = [f"swarm {out['swarm']}: {len(out['tables'])} pattern(s)"]
    entries = out.get("entries") or out["tables"]
    lines += [f"  {e}" if isinstance(e, str) else f"  {json.dumps(e)}" for e in entries]
    lines.append(f"matching now: {', '.join(out['matching']) or '(no table)'}")
    lines += [f"warning: {w}" for w in out.get("warnings", [])]
    return "\n".join(lines)


def _token_rows(tokens: list[dict[str, Any]]) -> str:
    rows = [
        (
            t["jti"],
            t["kind"],
            t["swarm"],
            t["agent"],
            "yes" if t["active"] else ("revoked" if t["revoked_at"] else "expired"),
            _when(t["expires_at"]),
            _when(t["last_used_at"]),
        )
        for t in tokens
    ]
    return table(["jti", "kind", "swarm", "agent", "active", "expires", "last used"], rows)


# --- commands -------------------------------------------------------------------------------------


def _swarms(server: LocalServer, args: argparse.Namespace) -> Any:
    if args.admin_command == "list":
        out = server.json("GET", "/v1/swarms")
        return out, _swarm_rows(out["swarms"])
    if args.admin_command == "create":
        body = {"name": args.name, "description": args.description, "tables": args.tables}
        out = server.json("POST", "/v1/swarms", json=body)
        return out, _swarm_rows([out])
    server.request("DELETE", f"/v1/swarms/{path_segment(args.name)}")
    return {"deleted": args.name}, f"deleted swarm {args.name} (its tokens are revoked)"


def _allowlists(server: LocalServer, args: argparse.Namespace) -> Any:
    path = f"/v1/swarms/{path_segment(args.swarm)}/allowlist"
    if args.admin_command == "get":
        out = server.json("GET", path)
    else:
        out = server.json("PUT", path, json={"tables": args.tables})
    return out, _allowlist(out)


def _tokens(server: LocalServer, args: argparse.Namespace) -> Any:
    if args.admin_command == "list":
        params: dict[str, Any] = {"include_inactive": str(args.all).lower(), "limit": args.limit}
        if args.swarm is not None:
            params["swarm"] = args.swarm
        out = server.json("GET", "/v1/tokens", params=params)
        return out, _token_rows(out["tokens"])
    if args.admin_command == "create":
        body = {k: getattr(args, k) for k in ("kind", "swarm", "agent", "ttl_seconds")}
        if args.attributes:
            body["attributes"] = dict(args.attributes)
        out = server.json("POST", "/v1/tokens", json={k: v for k, v in body.items() if v is not None})
        # The token alone on stdout (for `$(...)`), its record on stderr — with the attributes
        # it carries, so the admin sees what its row filters will bind.
        carried = f" attributes={json.dumps(out['attributes'])}" if out.get("attributes") else ""
        print(
            f"jti={out['jti']} kind={out['kind']} swarm={out['swarm']} agent={out['agent']} "
            f"expires_at={out['expires_at']}{carried}",
            file=sys.stderr,
        )
        return out, out["token"]
    if args.jti is not None:
        out = server.json("DELETE", f"/v1/tokens/{path_segment(args.jti)}")
        return out, _token_rows([out])
    body = {"swarm": args.swarm, "agent": args.agent}
    out = server.json("POST", "/v1/tokens/revoke", json={k: v for k, v in body.items() if v is not None})
    whose = f"agent {out['agent']} of swarm {out['swarm']}" if out["agent"] else f"swarm {out['swarm']}"
    return out, f"revoked {out['revoked']} token(s) of {whose}" + "".join(f"\n  {j}" for j in out["jtis"])


def _attributes(server: LocalServer, args: argparse.Namespace) -> Any:
    path = f"/v1/swarms/{path_segment(args.swarm)}/attributes"
    if args.admin_command == "get":
        out = server.json("GET", path)
    else:
        out = server.json("PUT", path, json=dict(args.attributes))
    values = out["attributes"]
    lines = [f"swarm {out['swarm']}: {len(values)} attribute(s)"]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in sorted(values.items())]
    return out, "\n".join(lines)


_AREAS: dict[str, Handler] = {
    "swarms": _swarms,
    "allowlist": _allowlists,
    "attributes": _attributes,
    "tokens": _tokens,
}


#: The ``set`` of each :func:`_get_set` area takes its values or ``--clear``, exactly one.
_SET_VALUES = {
    "allowlist": (
        "tables",
        "give the new allowlist's TABLE patterns, or --clear for an empty one (not both)",
    ),
    "attributes": (
        "attributes",
        "give the swarm's NAME=VALUE attributes, or --clear to remove them all (not both)",
    ),
}


def _usage_problem(args: argparse.Namespace) -> str | None:
    """Flag combinations argparse cannot express, refused (exit 2) before anything is sent."""
    if args.admin_command == "set" and args.admin_area in _SET_VALUES:
        dest, problem = _SET_VALUES[args.admin_area]
        if bool(getattr(args, dest)) == args.clear:
            return problem
    if args.admin_area == "tokens" and args.admin_command == "revoke":
        if args.jti is not None and (args.swarm is not None or args.agent is not None):
            return "revoke either one JTI or --swarm S [--agent A], not both"
        if args.jti is None and args.swarm is None:
            return "revoke needs a JTI, or --swarm S [--agent A] for every token of a swarm or agent"
    return None


def cmd_admin(args: argparse.Namespace, config: Config) -> int:
    where = f"quiver admin {args.admin_area} {args.admin_command}"
    problem = _usage_problem(args)
    if problem is not None:
        print(f"{where}: {problem}", file=sys.stderr)
        return 2
    token_file = Path(args.token_file) if args.token_file else None
    server = explicit_target(config, url=args.url, token_file=token_file) or running_server(
        config, url=args.url, token_file=token_file
    )
    if server is None:
        hint = ""
        if args.admin_area == "tokens" and args.admin_command == "create":
            hint = "; with the server stopped, `quiver token create` mints locally"
        raise Unavailable(
            f"no server holds {config.database_path} (is `quiver serve` running with this config?): "
            f"`quiver admin` works through the running server's control plane{hint}"
        )
    with server:
        out, text = _AREAS[args.admin_area](server, args)
    print(json.dumps(out, indent=2) if args.json else text)
    return 0
