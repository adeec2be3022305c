"""The ``quiver`` command: ``serve``, ``token create``, ``backup``, ``restore``, ``sync``,
``admin``, ``version``. Commands that need a running server reach it through
quiver/local_client.py."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from catalog import VERSION, Catalog, ConfigError, DatabaseInUse, NotFound, QuiverError, load_config
from catalog.errors import bounded
from catalog.identity import TOKEN_KINDS, UNSCOPED_KINDS
from catalog.resources import AddressSpaceBound
from catalog.swarms import check_swarm_name
from quiver import keys_cli, logs


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (default: quiver.toml if present)")
    p.add_argument("--data-dir", help="data directory (database, keys, tokens)")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    server: dict[str, Any] = {}
    for flag, key in (
        ("data_dir", "data_dir"),
        ("host", "host"),
        ("flight_port", "flight_port"),
        ("http_port", "http_port"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            server[key] = value
    return {"server": server}


def _load(args: argparse.Namespace) -> Any:
    path = args.config
    if path is None and Path("quiver.toml").exists():
        path = "quiver.toml"
    return load_config(path, overrides=_overrides(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quiver", description="Governed Arrow Flight access to warehouse data for AI agents."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Flight listener and the control plane")
    _config_args(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--flight-port", type=int, help="Arrow Flight port (default 8815; 0 = any free port)")
    serve.add_argument("--http-port", type=int, help="control plane port (default 8000; 0 = any free port)")
    serve.add_argument("--demo", action="store_true", help="seed the demo schema, swarm and agent token")

    token = sub.add_parser(
        "token",
        help="mint tokens locally (server stopped; with it running use `quiver admin tokens create`)",
    )
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser(
        "create",
        help="mint a token in the database (server stopped) and print it on stdout; an agent or "
        "swarm token needs its swarm to exist already",
    )
    _config_args(create)
    create.add_argument("--kind", required=True, choices=list(TOKEN_KINDS))
    create.add_argument("--swarm")
    create.add_argument("--agent")
    create.add_argument("--ttl", type=int, dest="ttl_seconds", help="lifetime in seconds")

    backup = sub.add_parser(
        "backup",
        help="write a consistent snapshot (database, signing key, artefacts) as .tar.gz; "
        "prints its path. Works while the server runs (through its control plane)",
    )
    _config_args(backup)
    backup.add_argument("--output", help="directory for the snapshot (default: [backup] dir)")
    backup.add_argument("--url", help="control plane URL when the server runs (default: from the config)")
    backup.add_argument(
        "--token-file", help="admin token when the server runs (default: DATA_DIR/admin.token)"
    )

    restore = sub.add_parser(
        "restore",
        help="replace the data directory with a snapshot (server stopped); the current "
        "state is kept in DATA_DIR/.pre-restore-<time>",
    )
    _config_args(restore)
    restore.add_argument("snapshot", help="a quiver-<time>.tar.gz written by `quiver backup`")

    from quiver import admin_cli, sync_cli

    sync_cli.add_parser(sub, _config_args)
    admin_cli.add_parser(sub, _config_args)
    keys_cli.add_parser(sub, _config_args)

    mcp = sub.add_parser(
        "mcp",
        help="serve the MCP tools over stdio, proxied to a Quiver over Arrow Flight (proto_docs/mcp.md)",
    )
    _config_args(mcp)
    mcp.add_argument("--url", required=True, help="the Quiver's Flight URL, e.g. grpc+tls://host:8815")
    mcp.add_argument("--token-file", required=True, help="a file holding an agent or swarm token")
    mcp.add_argument(
        "--http-url", help="the Quiver's control plane URL, for export download links (optional)"
    )
    mcp.add_argument("--tls-root-certs", help="PEM file of the CA that signed the server's certificate")

    sub.add_parser("version", help="print the version")
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from quiver.demo import SNIPPET
    from quiver.runtime import Runtime

    config = _load(args)
    logs.configure(config.server.log_format, config.server.log_level)
    # Everything the server writes in the data dir (database, WAL, tokens, results) is
    # private to its user, as under the systemd unit's UMask=0077.
    os.umask(0o077)
    # Past this bound an allocation fails inside the one query that made it (RESOURCE_EXHAUSTED)
    # instead of the kernel killing the process for every agent (catalog/resources.py).
    bound = AddressSpaceBound(config.limits.address_space_limit)
    runtime = Runtime(config, demo_data=args.demo, address_space=bound)
    endpoints = runtime.start()
    lines = [
        "",
        f"Quiver {VERSION} is serving.",
        f"  Arrow Flight:   {endpoints.flight_url}",
        f"  Control plane:  {endpoints.http_url}   (OpenAPI: {endpoints.http_url}/schema)",
        f"  Admin token:    {runtime.admin_token_path}",
    ]
    lines += [f"  WARNING: {w}" for w in runtime.warnings]
    if runtime.demo_token_path:
        lines.append(f"  Demo agent token: {runtime.demo_token_path}")
        lines.append("")
        env = []
        if endpoints.flight_url.replace("127.0.0.1", "localhost") != "grpc://localhost:8815":
            env.append(f"export QUIVER_URL={endpoints.flight_url}")
        if os.path.relpath(runtime.demo_token_path) != "var/demo-agent.token":
            env.append(f"export QUIVER_TOKEN_FILE={runtime.demo_token_path}")
        if env:
            lines += ["Read a demo table (in another terminal):", *env, "python - <<'EOF'"]
        else:
            lines += ["Read a demo table (in another terminal): python - <<'EOF'"]
        lines += [SNIPPET.rstrip(), "EOF"]
    lines += ["", "Stop with Ctrl-C.", ""]
    print("\n".join(lines), flush=True)
    runtime.serve_forever()
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.configure("json" if not sys.stderr.isatty() else config.server.log_format, "warning")
    catalog = Catalog(config)
    try:
        if (
            args.kind not in UNSCOPED_KINDS
            and args.swarm is not None
            and not catalog.swarms.exists(check_swarm_name(args.swarm))
        ):
            # The server's answer names POST /v1/swarms, which needs the server running.
            raise NotFound(
                f"swarm {bounded(args.swarm)!r} does not exist in {config.database_path}; start the server "
                f"(`quiver serve`), create it with `quiver admin swarms create {bounded(args.swarm)}` and mint "
                "the token there with `quiver admin tokens create`"
            )
        issued = catalog.tokens.mint(
            None, args.kind, swarm=args.swarm, agent=args.agent, ttl_seconds=args.ttl_seconds
        )
        catalog.audit.record("token.create", outcome="ok", actor="cli", target=issued.jti)
    finally:
        catalog.close()
    print(issued.token)
    print(
        f"jti={issued.jti} kind={issued.kind} swarm={issued.swarm} agent={issued.agent} "
        f"expires_at={issued.expires_at.isoformat()}",
        file=sys.stderr,
    )
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    """``quiver mcp``: stdout is the protocol's, so everything else goes to stderr."""
    from mcp_server import stdio

    config = _load(args)
    logs.configure("json", "warning")
    try:
        token = stdio.read_token(Path(args.token_file))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"quiver mcp: cannot read the token file: {e}", file=sys.stderr)
        return 2
    roots = Path(args.tls_root_certs).read_bytes() if args.tls_root_certs else None
    stdio.serve(args.url, token, config.mcp, http_url=args.http_url, tls_root_certs=roots)
    return 0


def main(argv: list[str] | None = None) -> int:  # noqa: C901, PLR0911  a dispatch on the subcommand
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "token":
            return cmd_token_create(args)
        if args.command in ("backup", "restore"):
            from quiver import ops

            config = _load(args)
            logs.configure("json" if not sys.stderr.isatty() else config.server.log_format, "warning")
            return ops.cmd_backup(args, config) if args.command == "backup" else ops.cmd_restore(args, config)
        if args.command == "keys":
            return keys_cli.cmd_keys(args, _load(args))
        if args.command == "version":
            print(VERSION)
            return 0
        if args.command == "mcp":
            return cmd_mcp(args)
        if args.command == "sync":
            from quiver import sync_cli

            config = _load(args)
            logs.configure(config.server.log_format, "warning" if sys.stdout.isatty() else "info")
            return sync_cli.cmd_sync(args, config)
        if args.command == "admin":
            from quiver import admin_cli

            config = _load(args)
            logs.configure("json" if not sys.stderr.isatty() else config.server.log_format, "warning")
            return admin_cli.cmd_admin(args, config)
    except ConfigError as e:
        print(f"quiver: config: {e}", file=sys.stderr)
        return 2
    except DatabaseInUse as e:
        print(
            f"quiver: {e}. With the server running, use `quiver admin tokens create` instead "
            "(POST /v1/tokens with an admin token).",
            file=sys.stderr,
        )
        return 1
    except QuiverError as e:
        print(f"quiver: {e.detail}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"quiver: {e}", file=sys.stderr)
        return 1
    return 2
