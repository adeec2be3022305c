"""The one client of this host's own control plane, shared by every CLI command that asks a
running ``quiver serve`` (``quiver sync``, ``quiver backup``, ``quiver admin``).

DuckDB lets one process hold the database file, so a command first checks the file's lock
(:func:`database_in_use`): free means the server is stopped and the command works on the
database itself; held means a server runs, and the command asks its control plane:

* **Where.** ``[server] host`` (a wildcard bind is reached on loopback) and ``http_port``;
  ``https`` when ``[tls]`` is set. The certificate is checked against the system trust *and*
  the configured certificate file (so a self-signed certificate works, as well as a Let's
  Encrypt one), by ``advertise_host`` when set (the public name the certificate is for,
  called on the loopback address), else ``localhost`` for an IP address.
* **Whose.** Before the admin token leaves the process, ``GET /.well-known/jwks.json`` (no
  credential) must list a key id of this data directory's signing key: another Quiver on
  the configured port (this one stopped, or moved to another port) is refused in one line
  and never sees the token. This guards against a mistaken target, not an impostor: a
  public key is public, and TLS is what authenticates the server.
* **With what.** ``DATA_DIR/admin.token``, read afresh for every request: the server renews
  that file while it runs (proto_docs/configuration.md, ``[tokens]``).
* **Refusals.** A ``{"error", "detail"}`` body becomes one line naming the request, the
  status, the code and the detail (:class:`ServerRefused`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import httpx
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from catalog import Config, QuiverError, Unavailable
from catalog.core import ADMIN_TOKEN_FILE
from catalog.errors import bounded
from catalog.keys import SigningKey

#: How long a single control-plane call may take unless the command says otherwise.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class NotThisServer(QuiverError):
    """The control plane on the configured port belongs to another data directory (or is not
    a Quiver at all): nothing was sent to it but an unauthenticated JWKS request."""

    code = "FAILED_PRECONDITION"
    http_status = 412


class ServerRefused(Unavailable):
    """The control plane answered with an error status; ``status`` and ``error`` are its
    HTTP status and Quiver error code (``""`` when the body was not Quiver's JSON)."""

    def __init__(self, detail: str, *, status: int, error: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error


class _ErrorBody(msgspec.Struct):
    error: str = ""
    detail: str = ""


class _Jwk(msgspec.Struct):
    kid: str = ""


class _Jwks(msgspec.Struct):
    keys: list[_Jwk]


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs folded) and bounded, for a message."""
    return bounded(" ".join(text.split()), limit)


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")  # noqa: S104 - comparing, not binding


def control_plane_target(config: Config) -> tuple[str, str | None]:
    """The URL of this host's own control plane and the TLS name to verify it by (None for
    plain HTTP)."""
    server = config.server
    host = server.host
    if _wildcard(host):
        host = "::1" if host == "::" else "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    if not config.tls.enabled:
        return f"http://{shown}:{server.http_port}", None
    name = server.advertise_host
    if name is None:
        try:
            ipaddress.ip_address(host)
            name = "localhost"
        except ValueError:
            name = host
    return f"https://{shown}:{server.http_port}", name


def tls_context(config: Config) -> ssl.SSLContext:
    """System trust plus the server's own certificate file as an anchor, so a self-signed
    certificate is trusted as well as a Let's Encrypt one."""
    context = ssl.create_default_context()
    if config.tls.cert_file:
        context.load_verify_locations(cafile=str(Path(config.tls.cert_file).expanduser()))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def database_in_use(config: Config) -> bool:
    """Whether a process (a running server) holds the database file. Opens it read-only and
    closes it at once, so a stopped server's database is not changed; a missing file is not
    in use. A server in this same process (tests) shows as a refused second configuration."""
    path = config.database_path
    if not path.exists():
        return False
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.ConnectionException:
        return True
    except duckdb.Error as e:
        if "lock" in str(e).lower():
            return True
        raise Unavailable(f"cannot open {path}: {one_line(str(e))}") from None
    with contextlib.closing(con):
        return con.execute("SELECT current_setting('lock_configuration')").fetchall() == [(True,)]


def local_key_ids(data_dir: Path) -> set[str]:
    """The key ids (RFC 7638 thumbprints, as in the JWKS) of the signing keys in
    ``DATA_DIR/keys``; read, never created."""
    kids: set[str] = set()
    for pem in sorted((data_dir / "keys").glob("*.pem")):
        try:
            key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
        except OSError as e:
            raise Unavailable(
                f"cannot read the signing key {pem} ({e.strerror}); run this command as the server's user"
            ) from None
        except ValueError:
            continue  # not a private key in PEM: not one of ours
        if isinstance(key, Ed25519PrivateKey):
            kids.add(SigningKey(key).kid)
    return kids


def path_segment(value: str) -> str:
    """``value`` quoted as one URL path segment: a name with '/' or '?' stays one segment, and
    '.' or '..' is not resolved away into another route."""
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="")


class LocalServer:
    """A connection to the control plane of the server that serves ``config``'s data
    directory. Every request first proves (once) that the server is that one."""

    def __init__(
        self,
        config: Config,
        *,
        url: str | None = None,
        token_file: Path | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        check_identity: bool = True,
    ) -> None:
        self.config = config
        target, tls_name = control_plane_target(config)
        if url is not None:
            target, tls_name = url.rstrip("/"), None
        self.url = target
        self.token_path = token_file or config.data_dir / ADMIN_TOKEN_FILE
        verify: ssl.SSLContext | bool = tls_context(config) if target.startswith("https:") else True
        self._extensions: dict[str, Any] = {"sni_hostname": tls_name} if tls_name else {}
        self._http = httpx.Client(base_url=target, verify=verify, timeout=timeout)
        # Off only when the caller named both the server and the token (explicit_target).
        self._verified = not check_identity

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, extensions=self._extensions, **kwargs)
        except httpx.HTTPError as e:
            reason = one_line(str(e) or type(e).__name__, 200)
            if "SSL" in reason or "certificate" in reason.lower():
                raise Unavailable(
                    f"TLS with {self.url} failed ({reason}); check [tls] cert_file (the certificate the "
                    "server presents, or its CA) and [server] advertise_host (the name it is for)"
                ) from None
            raise Unavailable(
                f"{self.config.database_path} is in use, but no control plane answers at {self.url} "
                f"({reason}); check [server] http_port and [tls], or pass --url"
            ) from None

    def verify_identity(self) -> None:
        """Refuse (:class:`NotThisServer`) unless the server publishes one of this data
        directory's signing keys. Sends no credential."""
        if self._verified:
            return
        ours = local_key_ids(self.config.data_dir)
        if not ours:
            raise NotThisServer(
                f"no signing key in {self.config.data_dir / 'keys'}, so the server on {self.url} cannot "
                "be verified as this data directory's; point --config (or --data-dir) at the server's data dir"
            )
        response = self._send("GET", "/.well-known/jwks.json")
        try:
            if response.status_code != 200:
                raise msgspec.DecodeError
            theirs = {k.kid for k in msgspec.json.decode(response.content, type=_Jwks).keys}
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise NotThisServer(
                f"the server on {self.url} is not a Quiver (GET /.well-known/jwks.json answered "
                f"{response.status_code}); stop it or point --config at the right port"
            ) from None
        if not ours & theirs:
            raise NotThisServer(
                f"the server on {self.url} is not the Quiver of {self.config.data_dir} (its signing key "
                "differs); stop it or point --config at its data dir"
            )
        self._verified = True

    def _token(self) -> str:
        try:
            token = self.token_path.read_text().strip()
        except OSError as e:
            raise Unavailable(
                f"a server is running but its admin token is unreadable ({self.token_path}: "
                f"{e.strerror}); run this as the server's user or pass --token-file"
            ) from None
        if not token:
            raise Unavailable(f"{self.token_path} is empty; pass --token-file")
        return token

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send an admin request (identity checked first, token read afresh); an error
        status raises :class:`ServerRefused` with one line."""
        self.verify_identity()
        kwargs: dict[str, Any] = {"headers": {"authorization": f"Bearer {self._token()}"}}
        if json is not None:
            kwargs["json"] = json
        if params is not None:
            kwargs["params"] = params
        if timeout is not None:
            kwargs["timeout"] = timeout
        response = self._send(method, path, **kwargs)
        # Quiver's routes never redirect; a 3xx is not followed (it would carry the token on).
        if response.status_code >= 300:
            raise self._refusal(method, path, response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request`, decoded as JSON (None for an empty body)."""
        response = self.request(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            raise Unavailable(
                f"{method} {self.url}{path} answered {response.status_code} with a body that is not JSON"
            ) from None

    def _refusal(self, method: str, path: str, response: httpx.Response) -> ServerRefused:
        try:
            body = msgspec.json.decode(response.content, type=_ErrorBody)
            error, detail = body.error, body.detail or response.text
        except (msgspec.DecodeError, msgspec.ValidationError):
            error, detail = "", response.text or response.reason_phrase
        hint = ""
        if response.status_code == 401:
            # The server keeps DATA_DIR/admin.token renewed while it runs, so a refusal means
            # another file or a token revoked by hand, not a lapse (proto_docs/configuration.md).
            hint = f" (token from {self.token_path}: is it this server's data directory?)"
        code = f" {error}" if error else ""
        return ServerRefused(
            f"{method} {self.url}{path} answered {response.status_code}{code}: {one_line(detail)}{hint}",
            status=response.status_code,
            error=error,
        )


def running_server(
    config: Config,
    *,
    url: str | None = None,
    token_file: Path | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
) -> LocalServer | None:
    """This data directory's running server, verified, or None when its database is free
    (the server is stopped; nothing is sent anywhere)."""
    if not database_in_use(config):
        return None
    server = LocalServer(config, url=url, token_file=token_file, timeout=timeout)
    try:
        server.verify_identity()
    except BaseException:
        server.close()
        raise
    return server


def explicit_target(config: Config, *, url: str | None, token_file: Path | None) -> LocalServer | None:
    """A server the operator named together with the token for it (``--url`` and
    ``--token-file``, e.g. an admin's laptop and a remote Quiver): no lock or identity check,
    since neither the server nor the token comes from this data directory. None otherwise."""
    if url is None or token_file is None:
        return None
    return LocalServer(config, url=url, token_file=token_file, check_identity=False)
