"""``quiver keys list|rotate``: the operator's side of catalog/keys.py.

``rotate`` needs the server stopped. The running server holds the database and signs with the
key it loaded at start-up; a key replaced on disk under it would split the two (new tokens
signed by a key the file no longer holds), so the command refuses in one line instead and
changes nothing. Stopped, it opens the catalog, makes a new key the active one, keeps the
previous one verifying until the last token it signed expires, and re-signs
``DATA_DIR/admin.token`` with the new key. See proto_docs/authentication.md ("Signing keys").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from catalog import Catalog, Config, DatabaseInUse
from catalog.keys import SIGNING_FILE, KeyRing
from quiver import logs

ConfigArgs = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: Any, config_args: ConfigArgs) -> None:
    keys = sub.add_parser("keys", help="list or rotate the token signing keys (rotate: server stopped)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    listing = ksub.add_parser("list", help="the active signing key and the previous keys that still verify")
    config_args(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rotate = ksub.add_parser(
        "rotate",
        help="sign new tokens with a new key; the previous key verifies until its last token "
        "expires (server stopped)",
    )
    config_args(rotate)
    rotate.add_argument(
        "--retire-previous",
        action="store_true",
        help="after a leak: keep no previous key, so every token signed before is refused at once",
    )


def cmd_keys(args: argparse.Namespace, config: Config) -> int:
    logs.configure("json" if not sys.stderr.isatty() else config.server.log_format, "warning")
    if args.keys_command == "list":
        return _list(config, as_json=args.json)
    return _rotate(config, retire_previous=args.retire_previous)


def _list(config: Config, *, as_json: bool) -> int:
    directory = config.data_dir / "keys"
    if not (directory / SIGNING_FILE).is_file():
        print(f"quiver: no signing key in {directory} yet (the first start creates it)", file=sys.stderr)
        return 1
    keys = KeyRing.load_or_create(directory).describe(config.tokens.leeway_seconds)
    if as_json:
        print(msgspec.json.encode(keys).decode())
        return 0
    for key in keys:
        until = key.verifies_until.isoformat() if key.verifies_until else "-"
        print(f"{key.kid}  {key.status:<8}  verifies until {until}")
    return 0


def _rotate(config: Config, *, retire_previous: bool = False) -> int:
    try:
        catalog = Catalog(config)
    except DatabaseInUse:
        print(
            f"quiver: keys rotate: the server is running ({config.database_path} is in use); stop it "
            "(systemctl stop quiver), run `quiver keys rotate`, then start it again. Nothing was changed",
            file=sys.stderr,
        )
        return 1
    try:
        previous = catalog.keys.active.kid
        kid = catalog.rotate_signing_key(actor="cli", retire_previous=retire_previous)
        until = next(
            (
                k.verifies_until
                for k in catalog.keys.describe(config.tokens.leeway_seconds)
                if k.kid == previous
            ),
            None,
        )
    finally:
        catalog.close()
    print(kid)
    if retire_previous:
        shown = "no longer: every token it signed is refused (previous keys retired)"
    else:
        shown = "until " + (until.isoformat() if until else "now (it signed no live token)")
    print(
        f"new signing key {kid} is active; the previous key {previous} verifies {shown}; "
        f"{config.data_dir / 'admin.token'} was re-signed with the new key",
        file=sys.stderr,
    )
    return 0
