"""make deploy-test-boot: checks run INSIDE the booted container by Quiver's own venv
python (so only the standard library and pyarrow), as root.

    boot_check.py before-restore   services, TLS, redirect, fail2ban ban, backup service;
                                   prints "snapshot: PATH"
    boot_check.py after-restore    Quiver healthy again with the snapshot's state
    boot_check.py pebble-start     run Debian's pebble (an ACME test server) in here
    boot_check.py letsencrypt      after site.yml with tls_mode=letsencrypt against pebble:
                                   Quiver serves pebble's certificate; a forced renewal runs
                                   the deploy hook, which restarts Quiver with the new one
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

NAME = "quiver.test"
CERT = "/etc/quiver/tls/fullchain.pem"
ADMIN = Path("/var/lib/quiver/admin.token")
failures: list[str] = []


def check(ok: bool, what: str, detail: Any = "") -> None:
    print(f"  {'ok ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""), flush=True)
    if not ok:
        failures.append(what)


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def https(method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    """HTTPS to the public name (resolved to this container), certificate verified."""
    context = ssl.create_default_context(cafile=CERT)
    conn = http.client.HTTPSConnection(NAME, 443, context=context, timeout=30)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


def wait_healthy() -> bool:
    for _ in range(60):
        try:
            if https("GET", "/healthz")[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(1)
    return False


def before_restore() -> None:
    for unit in (
        "quiver.service",
        "nginx.service",
        "fail2ban.service",
        "quiver-backup.timer",
        "certbot.timer",
    ):
        state = sh("systemctl", "is-active", unit).stdout.strip()
        if unit == "certbot.timer":
            continue  # installed only with tls_mode letsencrypt
        check(state == "active", f"{unit} is active", state)
    ufw = sh("ufw", "status", "verbose").stdout
    check("Status: active" in ufw and "deny (incoming)" in ufw, "UFW is enabled, deny incoming", ufw)
    check(
        "443/tcp" in ufw and "8815/tcp" in ufw and "LIMIT IN" in ufw,
        "UFW rules for 443, 8815, limited ssh",
        ufw,
    )
    show = sh(
        "systemctl", "show", "quiver.service", "-p", "User,NoNewPrivileges,ProtectSystem,MemoryMax"
    ).stdout
    check(
        "User=quiver" in show and "NoNewPrivileges=yes" in show and "ProtectSystem=strict" in show,
        "unit hardening in effect",
        show,
    )

    check(wait_healthy(), "https://quiver.test/healthz answers 200 (certificate checked)")
    token = ADMIN.read_text().strip()
    for name in ("boot-drill", "after-backup"):  # left over from an earlier run on this root
        https("DELETE", f"/v1/swarms/{name}", token)
    status, _ = https("POST", "/v1/swarms", token, {"name": "boot-drill", "tables": ["demo.*"]})
    check(status == 201, "create swarm boot-drill", status)

    conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
    conn.request("GET", "/v1/status?x=1", headers={"host": NAME})
    response = conn.getresponse()
    check(
        response.status == 301 and response.getheader("location") == f"https://{NAME}/v1/status?x=1",
        "port 80 redirects to https",
        (response.status, response.getheader("location")),
    )
    conn.close()

    client = flight.FlightClient(f"grpc+tls://{NAME}:8815", tls_root_certs=Path(CERT).read_bytes())
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    check(isinstance(list(client.list_flights(options=opts)), list), "Flight over TLS on 8815")
    client.close()

    # fail2ban reads the journal: enough bad tokens get the address banned.
    for _ in range(40):
        https("GET", "/v1/swarms", "not-a-token")
    banned = ""
    for _ in range(30):
        banned = sh("fail2ban-client", "get", "quiver-auth", "banip").stdout
        if "127.0.0.1" in banned:
            break
        time.sleep(1)
    check("127.0.0.1" in banned, "fail2ban banned the address behind the bad tokens", banned)
    ufw = sh("ufw", "status").stdout
    check("REJECT      127.0.0.1" in ufw and "Fail2Ban" in ufw, "the ban is a UFW rule", ufw)
    sh("fail2ban-client", "unban", "--all")

    run = sh("systemctl", "start", "quiver-backup.service")
    check(run.returncode == 0, "systemctl start quiver-backup.service", run.stderr)
    journal = sh("journalctl", "-u", "quiver-backup.service", "--no-pager", "-o", "cat").stdout
    wrote = [line.split("wrote ", 1)[1] for line in journal.splitlines() if "quiver-backup: wrote " in line]
    check(bool(wrote) and Path(wrote[-1]).is_file(), "the backup service wrote a snapshot", journal[-2000:])
    status, _ = https("POST", "/v1/swarms", token, {"name": "after-backup", "tables": []})
    check(status == 201, "create swarm after-backup (not in the snapshot)", status)
    if wrote:
        print(f"snapshot: {wrote[-1]}")


def after_restore() -> None:
    check(
        sh("systemctl", "is-active", "quiver").stdout.strip() == "active",
        "quiver is active after restore.yml",
    )
    check(wait_healthy(), "healthy after restore.yml")
    token = ADMIN.read_text().strip()
    status, body = https("GET", "/v1/swarms", token)
    names = sorted(s["name"] for s in body["swarms"]) if status == 200 else []
    check("boot-drill" in names and "after-backup" not in names, "the state is the snapshot's", names)
    check(
        sh("systemctl", "is-active", "quiver-backup.timer").stdout.strip() == "active",
        "backup timer active again",
    )


PEBBLE_DIR = Path("/etc/pebble")
PEBBLE_CA = PEBBLE_DIR / "listener.pem"


def pebble_start() -> None:
    """pebble's own HTTPS listener needs a certificate: a self-signed one for 127.0.0.1;
    HTTP-01 challenges go to port 80 of the name being validated (nginx's webroot)."""
    PEBBLE_DIR.mkdir(exist_ok=True)
    made = sh(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=pebble",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout",
        str(PEBBLE_DIR / "listener.key"),
        "-out",
        str(PEBBLE_CA),
    )
    check(made.returncode == 0, "certificate for pebble's listener", made.stderr)
    config = {
        "pebble": {
            "listenAddress": "127.0.0.1:14000",
            "managementListenAddress": "127.0.0.1:15000",
            "certificate": str(PEBBLE_CA),
            "privateKey": str(PEBBLE_DIR / "listener.key"),
            "httpPort": 80,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    (PEBBLE_DIR / "config.json").write_text(json.dumps(config))
    sh("systemctl", "stop", "pebble.service")
    run = sh(
        "systemd-run",
        "--unit",
        "pebble",
        "--setenv=PEBBLE_VA_NOSLEEP=1",
        "--setenv=PEBBLE_WFE_NONCEREJECT=0",
        "/usr/bin/pebble",
        "-config",
        str(PEBBLE_DIR / "config.json"),
    )
    check(run.returncode == 0, "pebble started", run.stderr)
    for _ in range(50):
        try:
            ctx = ssl.create_default_context(cafile=str(PEBBLE_CA))
            conn = http.client.HTTPSConnection("127.0.0.1", 14000, context=ctx, timeout=5)
            conn.request("GET", "/dir")
            if conn.getresponse().status == 200:
                check(True, "pebble answers its ACME directory")
                return
        except OSError:
            time.sleep(0.2)
    check(
        False,
        "pebble answers its ACME directory",
        sh("journalctl", "-u", "pebble", "--no-pager").stdout[-2000:],
    )


def _pebble_root() -> Path:
    ctx = ssl.create_default_context(cafile=str(PEBBLE_CA))
    conn = http.client.HTTPSConnection("127.0.0.1", 15000, context=ctx, timeout=10)
    conn.request("GET", "/roots/0")
    root = PEBBLE_DIR / "issuing-root.pem"
    root.write_bytes(conn.getresponse().read())
    return root


def _served_certificate() -> bytes:
    root = _pebble_root()
    ctx = ssl.create_default_context(cafile=str(root))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", 443)), server_hostname=NAME) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def letsencrypt() -> None:
    live = Path(f"/etc/letsencrypt/live/{NAME}/fullchain.pem")
    check(live.exists(), "certbot obtained a certificate from the ACME server")
    check(Path(CERT).read_bytes() == live.read_bytes(), "Quiver's copy is certbot's certificate")
    check(wait_healthy_with(_pebble_root()), "Quiver serves it: TLS verified against the ACME server's root")
    hook = Path("/etc/letsencrypt/renewal-hooks/deploy/quiver")
    check(hook.exists() and hook.stat().st_mode & 0o111, "the deploy hook is installed")
    first = _served_certificate()
    pid_before = sh("systemctl", "show", "quiver", "-p", "MainPID", "--value").stdout.strip()
    renew = subprocess.run(
        ["certbot", "renew", "--force-renewal", "--no-random-sleep-on-renew"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "REQUESTS_CA_BUNDLE": str(PEBBLE_CA)},
    )
    check(renew.returncode == 0, "certbot renew --force-renewal", renew.stdout + renew.stderr)
    check(wait_healthy_with(_pebble_root()), "healthy after the renewal")
    pid_after = sh("systemctl", "show", "quiver", "-p", "MainPID", "--value").stdout.strip()
    check(pid_before != pid_after, "the deploy hook restarted Quiver", (pid_before, pid_after))
    check(_served_certificate() != first, "Quiver serves the renewed certificate")


def wait_healthy_with(root: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(root))
    for _ in range(60):
        try:
            conn = http.client.HTTPSConnection(NAME, 443, context=ctx, timeout=10)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(1)
    return False


if __name__ == "__main__":
    phases = {
        "before-restore": before_restore,
        "after-restore": after_restore,
        "pebble-start": pebble_start,
        "letsencrypt": letsencrypt,
    }
    phases[sys.argv[1]]()
    if failures:
        print(f"FAILED: {failures}")
        raise SystemExit(1)
