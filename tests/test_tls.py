"""TLS on both listeners from ``[tls] cert_file, key_file``: a certificate authority and a
server certificate are made in the test, and real clients check them."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pyarrow.flight as flight
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from catalog import ConfigError, load_config
from quiver import ops
from tests.harness import Server, call_options, error_info, start_server

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Quiver test CA"))
        .issuer_name(_name("Quiver test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(root / "pki")
    server = start_server(root / "data", tls={"cert_file": str(cert), "key_file": str(key)})
    yield server, ca
    server.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_flight_serves_tls_only(tls_server: tuple[Server, Path]) -> None:
    server, ca = tls_server
    assert server.flight_url.startswith("grpc+tls://127.0.0.1:")
    client = flight.FlightClient(server.flight_url, tls_root_certs=ca.read_bytes())
    try:
        names = sorted(
            ".".join(p.decode() for p in fi.descriptor.path)
            for fi in client.list_flights(options=call_options(server.demo_token))
        )
        assert names == ["demo.customers", "demo.events", "demo.orders"]
        # Errors still carry Quiver's code over TLS.
        with pytest.raises(flight.FlightUnauthenticatedError) as exc:
            list(client.list_flights(options=call_options("not-a-token")))
        assert error_info(exc.value)["code"] == "UNAUTHENTICATED"
    finally:
        client.close()

    # A plaintext gRPC client cannot talk to the TLS port.
    plain = flight.FlightClient(f"grpc://localhost:{_port(server.flight_url)}")
    try:
        with pytest.raises(flight.FlightUnavailableError):
            list(plain.list_flights(options=call_options(server.demo_token, timeout=5)))
    finally:
        plain.close()

    # Nor can a TLS client that does not trust the certificate.
    stranger = flight.FlightClient(server.flight_url)
    try:
        with pytest.raises(flight.FlightUnavailableError):
            list(stranger.list_flights(options=call_options(server.demo_token, timeout=5)))
    finally:
        stranger.close()


def test_flight_sql_over_tls(tls_server: tuple[Server, Path]) -> None:
    """The ADBC Flight SQL driver with the private CA, as proto_docs/flight-sql.md says."""
    import adbc_driver_flightsql.dbapi as flight_sql

    server, ca = tls_server
    conn = flight_sql.connect(
        server.flight_url,
        db_kwargs={
            "adbc.flight.sql.authorization_header": f"Bearer {server.demo_token}",
            "adbc.flight.sql.client_option.tls_root_certs": ca.read_text(),
        },
        autocommit=True,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM demo.customers")
            assert cur.fetchall() == [(1000,)]
    finally:
        conn.close()


def test_control_plane_serves_tls_only(tls_server: tuple[Server, Path]) -> None:
    server, ca = tls_server
    assert server.http_url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as client:
        r = client.get(f"{server.http_url}/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        listeners = r.json()["listeners"]
        assert listeners["flight"]["url"].startswith("grpc+tls://")
        assert listeners["http"]["url"].startswith("https://")
        r = client.get(
            f"{server.http_url}/v1/status", headers={"authorization": f"Bearer {server.admin_token}"}
        )
        assert r.status_code == 200
    port = _port(server.http_url)
    with httpx.Client(timeout=5) as plain, pytest.raises(httpx.TransportError):
        plain.get(f"http://127.0.0.1:{port}/healthz")
    with httpx.Client(timeout=5) as untrusting, pytest.raises(httpx.ConnectError):
        untrusting.get(f"https://localhost:{port}/healthz")


def test_backup_cli_reaches_the_tls_control_plane(tls_server: tuple[Server, Path], tmp_path: Path) -> None:
    """What the backup timer does on the VM: call the TLS-only control plane on loopback,
    checking the certificate by name, with the admin token from the data directory."""
    server, _ = tls_server
    config = server.catalog.config
    config = msgspec.structs.replace(
        config, server=msgspec.structs.replace(config.server, http_port=_port(server.http_url))
    )
    url, name = ops.control_plane_target(config)
    assert url.startswith("https://127.0.0.1:") and name == "localhost"
    info = ops.backup_via_server(config, url=None, token_file=None, output=tmp_path / "out")
    assert Path(info.path).parent == tmp_path / "out" and Path(info.path).is_file()


def test_tls_config_errors_name_the_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match=r"tls\.key_file is missing"):
        load_config(None, environ={}, overrides={"tls": {"cert_file": str(cert)}})
    with pytest.raises(ConfigError, match=r"tls\.key_file: no such file"):
        load_config(
            None, environ={}, overrides={"tls": {"cert_file": str(cert), "key_file": str(tmp_path / "no")}}
        )
    with pytest.raises(ConfigError, match=r"unknown key `tls\.certfile`"):
        load_config(None, environ={"QUIVER_TLS_CERTFILE": "x"})
