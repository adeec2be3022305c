"""How Quiver connects to Snowflake: the ``[snowflake]`` section as
``snowflake.connector.connect`` arguments, secrets read from their files.

Shared by the sync worker (sync/source.py) and live tables (catalog/live.py): both must log in
the same way, bound a dead source with the same timeouts, and keep the same secrets out of
their messages. It lives in ``catalog`` because the data plane may not import ``sync``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catalog.config import SnowflakeConfig

# Snowflake error numbers that mean "your credentials were refused": never transient.
AUTH_ERRNOS = {390100, 390101, 390102, 390144, 390190, 390191, 390195, 390302, 390318}


class SecretUnreadable(Exception):
    """A ``*_file`` secret of ``[snowflake]`` could not be read (the message names the key)."""


def connect_args(config: SnowflakeConfig) -> tuple[dict[str, Any], list[str]]:
    """The connector's arguments and the secrets among them (for scrubbing messages)."""
    c = config
    secrets: list[str] = []
    args: dict[str, Any] = {
        "account": c.account,
        "user": c.user,
        "login_timeout": c.login_timeout,
        "network_timeout": c.network_timeout,
        "socket_timeout": c.socket_timeout,
        "protocol": c.protocol,
        "paramstyle": "qmark",
        # NUMBER(p,s) as exact decimals, never scaled integers or floats.
        "arrow_number_to_decimal": True,
        "application": "Quiver",
        "client_session_keep_alive": False,
        "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
    }
    for key in ("role", "warehouse", "database", "schema", "host", "port"):
        value = getattr(c, key)
        if value is not None:
            args[key] = value
    password = c.password
    if password is None and c.password_file:
        password = read_secret(c.password_file, "snowflake.password_file")
    if password:
        args["password"] = password
        secrets.append(password)
    if c.private_key_file:
        args["private_key_file"] = c.private_key_file
        args["authenticator"] = "SNOWFLAKE_JWT"
        if c.private_key_passphrase_file:
            passphrase = read_secret(c.private_key_passphrase_file, "snowflake.private_key_passphrase_file")
            args["private_key_file_pwd"] = passphrase
            secrets.append(passphrase)
    return args, secrets


def read_secret(path: str, key: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise SecretUnreadable(f"{key}: cannot read {path}: {e.strerror}") from None


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text
