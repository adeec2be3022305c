"""make deploy-test, second half: check a Debian root that site.yml configured, then run
the deployed Quiver inside it and do the backup/restore drill with restore.yml.

Usage (as root, after deploy_test.sh applied site.yml): python deploy_check.py ROOT
(and, after site.yml with the upgrade wheel: python deploy_check.py ROOT --upgrade-rollback)

Everything runs for real: Quiver from the venv the playbook built, with the quiver.toml,
certificate and unit user it templated; fail2ban-regex and nginx from the root; the
backup script the timer runs; restore.yml through the chroot connection. Only the ports
differ (QUIVER_SERVER_* variables, high ports on 127.0.0.1), because this root shares the
network of the machine running the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pyarrow.flight as flight

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".venv-ansible" / "bin"
DOMAIN = "quiver.test"
SECRET = "not-a-real-snowflake-password"
failures: list[str] = []


def check(ok: bool, what: str, detail: Any = "") -> None:
    print(f"  {'ok ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""), flush=True)
    if not ok:
        failures.append(what)


def chroot(
    root: Path, *argv: str, user: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = ["chroot", str(root)]
    if user:
        cmd += ["runuser", "-u", user, "--"]
    if env:
        cmd += ["env", *(f"{k}={v}" for k, v in env.items())]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300, env=_clean_env())


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "TERM")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- static checks -------------------------------------------------------------------------


def check_static(root: Path) -> None:
    print("static checks", flush=True)
    r = chroot(root, "getent", "passwd", "quiver")
    fields = r.stdout.strip().split(":")
    check(r.returncode == 0 and len(fields) == 7, "the quiver user exists", r.stdout + r.stderr)
    if len(fields) == 7:
        check(int(fields[2]) < 1000, "quiver is a system user", fields[2])
        check(fields[5] == "/var/lib/quiver" and fields[6] == "/usr/sbin/nologin", "no login shell", fields)

    venv = root / "opt/quiver/venv"
    check(venv.is_symlink() and "releases/" in os.readlink(venv), "the venv is the current release", venv)
    r = chroot(
        root,
        "/opt/quiver/venv/bin/python",
        "-c",
        "import quiver, catalog, flight_server, control_plane, sync; print(catalog.VERSION)",
    )
    check(r.returncode == 0 and r.stdout.strip(), "Quiver imports from the venv", r.stderr)
    r = chroot(root, "/opt/quiver/venv/bin/quiver", "version")
    check(r.returncode == 0, "the quiver command runs", r.stderr)

    unit = (root / "etc/systemd/system/quiver.service").read_text()
    for line in (
        "User=quiver",
        "ExecStart=/opt/quiver/venv/bin/quiver serve --config /etc/quiver/quiver.toml",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/quiver",
        "PrivateTmp=true",
        "MemoryMax=3G",
        "Restart=on-failure",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "Type=notify",
        "WatchdogSec=60",
        "SystemCallFilter=@system-service",
        "ProcSubset=pid",
        "MemoryDenyWriteExecute=true",
    ):
        check(line in unit.splitlines(), f"unit has {line}")
    r = chroot(root, "systemd-analyze", "verify", "/etc/systemd/system/quiver.service")
    check(r.returncode == 0, "systemd-analyze verify quiver.service", r.stdout + r.stderr)
    check_security_score(root)

    units = ["quiver.service", "quiver-backup.timer", "fail2ban.service", "nginx.service", "chrony.service"]
    r = chroot(root, "systemctl", "is-enabled", *units)
    check(r.stdout.split() == ["enabled"] * len(units), f"enabled: {', '.join(units)}", r.stdout + r.stderr)
    timer = (root / "etc/systemd/system/quiver-backup.timer").read_text()
    check("OnCalendar=" in timer and "Persistent=true" in timer, "backup timer: nightly, persistent")
    backup_unit = (root / "etc/systemd/system/quiver-backup.service").read_text()
    check("OnFailure=quiver-backup-failed.service" in backup_unit, "backup unit: OnFailure reports a failure")
    r = chroot(root, "systemd-analyze", "verify", "/etc/systemd/system/quiver-backup-failed.service")
    check(r.returncode == 0, "systemd-analyze verify quiver-backup-failed.service", r.stdout + r.stderr)

    rules = (root / "etc/ufw/user.rules").read_text() + (root / "etc/ufw/user6.rules").read_text()
    for want in (
        "--dport 80 -j ACCEPT",
        "--dport 443 -s 192.0.2.0/24 -j ACCEPT",
        "--dport 8815 -s 198.51.100.0/24 -j ACCEPT",
        "--dport 8815 -s 203.0.113.0/24 -j ACCEPT",
    ):
        check(want in rules, f"ufw rule {want}")
    for unwanted in ("--dport 443 -j ACCEPT", "--dport 8815 -j ACCEPT", "--dport 443 -s 198.51.100.0/24"):
        check(unwanted not in rules, f"no ufw rule {unwanted} (admin and agent sources apart)")
    check(
        "--dport 22 -s 192.0.2.0/24 -j ufw-user-limit" in rules, "ufw: ssh rate-limited from the admin CIDR"
    )
    check('DEFAULT_INPUT_POLICY="DROP"' in (root / "etc/default/ufw").read_text(), "ufw: deny incoming")
    check(
        "ENABLED=no" in (root / "etc/ufw/ufw.conf").read_text(), "ufw configured but not enabled in a chroot"
    )

    r = chroot(root, "fail2ban-client", "-t")
    check(r.returncode == 0, "fail2ban-client -t", r.stdout + r.stderr)
    r = chroot(root, "fail2ban-client", "-d")
    check("'quiver-auth'" in r.stdout and "'sshd'" in r.stdout, "jails sshd and quiver-auth", r.stderr)
    r = chroot(root, "nginx", "-t")
    check(r.returncode == 0, "nginx -t", r.stderr)

    secret = root / "etc/quiver/secrets/snowflake_password"
    st = secret.stat()
    check(secret.read_text() == SECRET, "the vaulted secret was decrypted into its file")
    check(
        oct(st.st_mode & 0o777) == "0o640" and st.st_uid == 0,
        "the secret is root:quiver 0640",
        oct(st.st_mode),
    )
    toml = (root / "etc/quiver/quiver.toml").read_text()
    check(SECRET not in toml, "the secret is not in quiver.toml")
    check('cert_file = "/etc/quiver/tls/fullchain.pem"' in toml, "quiver.toml turns TLS on")


MAX_EXPOSURE = 2.5


def check_security_score(root: Path) -> None:
    """``systemd-analyze security`` of the installed unit, offline: the root is not booted,
    so the unit file is read from disk (the same assessment as on a running system, minus
    nothing the unit file does not already say)."""
    r = chroot(
        root,
        "systemd-analyze",
        "security",
        "--offline=true",
        "--no-pager",
        "/etc/systemd/system/quiver.service",
    )
    line = next((x for x in r.stdout.splitlines() if "Overall exposure level" in x), "")
    try:
        score = float(line.split(":")[1].split()[0])
    except (IndexError, ValueError):
        check(False, "systemd-analyze security prints a score", r.stdout[-2000:] + r.stderr)
        return
    print(f"  systemd-analyze security quiver.service: {score} (fails above {MAX_EXPOSURE})", flush=True)
    failing = [x.strip() for x in r.stdout.splitlines() if x.lstrip().startswith("✗")]
    check(score <= MAX_EXPOSURE, f"exposure {score} <= {MAX_EXPOSURE}", "\n".join(failing))


# --- Quiver running inside the root ------------------------------------------------------------


@contextmanager
def mounted_proc(root: Path) -> Iterator[None]:
    target = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


class Running:
    def __init__(self, root: Path, log: Path) -> None:
        self.http_port, self.flight_port = free_port(), free_port()
        self.env = {
            "QUIVER_SERVER_HOST": "127.0.0.1",
            "QUIVER_SERVER_HTTP_PORT": str(self.http_port),
            "QUIVER_SERVER_FLIGHT_PORT": str(self.flight_port),
        }
        cmd = ["chroot", str(root), "runuser", "-u", "quiver", "--", "env"]
        cmd += [f"{k}={v}" for k, v in self.env.items()]
        cmd += ["/opt/quiver/venv/bin/quiver", "serve", "--config", "/etc/quiver/quiver.toml"]
        self.log = log
        self._out = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=self._out, env=_clean_env(), start_new_session=True
        )
        deadline = time.monotonic() + 90
        while '"quiver.started"' not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Quiver did not start in the root:\n" + log.read_text()[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)
        self._out.close()


def tls_context(root: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(root / "etc/quiver/tls/fullchain.pem"))


def http(root: Path, server: Running) -> httpx.Client:
    """https://127.0.0.1:PORT, with the certificate checked against the public name."""
    return httpx.Client(
        base_url=f"https://127.0.0.1:{server.http_port}", verify=tls_context(root), timeout=30
    )


def get(client: httpx.Client, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return client.request(
        kw.pop("method", "GET"), path, headers=headers, extensions={"sni_hostname": DOMAIN}, **kw
    )


def ansible(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "PIP_FIND_LINKS"}
    env["PATH"] = f"{TOOLS}{os.pathsep}{env['PATH']}"
    env["ANSIBLE_HOME"] = str(REPO / "ansible/.ansible")
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            "tests/inventory",
            "--vault-password-file",
            "tests/vault-password.txt",
            *argv,
        ],
        cwd=REPO / "ansible",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_live(root: Path, work: Path) -> None:  # noqa: PLR0915  one check of the live system, step by step
    print("Quiver running in the root", flush=True)
    log = work / "quiver-live.log"
    log.write_text("")
    server = Running(root, log)
    try:
        admin = (root / "var/lib/quiver/admin.token").read_text().strip()
        with http(root, server) as client:
            r = get(client, "/healthz")
            check(r.status_code == 200, "GET /healthz over TLS, certificate checked by name", r.text)
            check(
                r.json()["listeners"]["flight"]["url"].startswith(f"grpc+tls://{DOMAIN}:"),
                "Flight URL is grpc+tls",
            )
            r = get(client, "/v1/swarms", "wrong-token")
            check(r.status_code == 401, "a bad token is refused", r.text)
            r = get(client, "/v1/swarms", admin, method="POST", json={"name": "drill", "tables": ["demo.*"]})
            check(r.status_code == 201, "create swarm 'drill'", r.text)
        try:
            httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)
            check(False, "plain HTTP is refused on the TLS port")
        except httpx.TransportError:
            check(True, "plain HTTP is refused on the TLS port")

        fc = flight.FlightClient(
            f"grpc+tls://127.0.0.1:{server.flight_port}",
            tls_root_certs=(root / "etc/quiver/tls/fullchain.pem").read_bytes(),
            override_hostname=DOMAIN,
        )
        opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {admin}".encode())])
        check(isinstance(list(fc.list_flights(options=opts)), list), "Flight ListFlights over TLS")
        bad = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer wrong")])
        try:
            list(fc.list_flights(options=bad))
            check(False, "Flight refuses a bad token")
        except flight.FlightUnauthenticatedError:
            check(True, "Flight refuses a bad token")
        fc.close()

        time.sleep(0.5)
        lines = [line for line in log.read_text().splitlines() if '"auth.failed"' in line]
        (root / "tmp/quiver-auth.log").write_text("\n".join(lines) + "\n")
        r = chroot(
            root,
            "fail2ban-regex",
            "--out",
            "ip",
            "/tmp/quiver-auth.log",
            "/etc/fail2ban/filter.d/quiver-auth.conf",
        )
        check(
            r.stdout.split() == ["127.0.0.1", "127.0.0.1"],
            "fail2ban-regex: both listeners' failures, real lines",
            r.stdout + r.stderr,
        )

        r = chroot(root, "/usr/local/sbin/quiver-backup", user="quiver", env=server.env)
        snapshot = r.stdout.split("wrote ")[-1].split()[0] if "wrote " in r.stdout else ""
        check(
            r.returncode == 0 and snapshot.startswith("/var/backups/quiver/quiver-"),
            "the timer's backup script, server running",
            r.stdout + r.stderr,
        )
        check(
            "through the running server" in r.stderr,
            "the backup went through the TLS control plane",
            r.stderr,
        )
    finally:
        server.stop()
    if not snapshot:
        return

    print("restore drill", flush=True)
    data = root / "var/lib/quiver"
    for entry in data.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    r = ansible("restore.yml", "-e", "restore_snapshot=/var/backups/quiver/does-not-exist.tar.gz")
    check(
        r.returncode != 0 and "No snapshot at" in r.stdout,
        "restore.yml refuses a missing snapshot",
        r.stdout[-2000:],
    )
    check(list(data.iterdir()) == [], "…and changes nothing")
    r = ansible("restore.yml", "-e", f"restore_snapshot={snapshot}")
    check(r.returncode == 0, "restore.yml restores the snapshot", r.stdout[-3000:])
    owners = {p.stat().st_uid for p in data.rglob("*")}
    quiver_uid = int(chroot(root, "id", "-u", "quiver").stdout)
    check(owners == {quiver_uid}, "restored files belong to quiver", owners)

    log2 = work / "quiver-restored.log"
    log2.write_text("")
    server = Running(root, log2)
    try:
        with http(root, server) as client:
            r = get(client, "/v1/swarms/drill", admin)
            check(
                r.status_code == 200 and r.json()["tables"] == ["demo.*"],
                "after the restore: swarm and admin token are back",
                r.text,
            )
    finally:
        server.stop()


def migrations(root: Path) -> list[str]:
    """The migrations applied to the root's database (read with the host's DuckDB)."""
    import duckdb

    con = duckdb.connect(str(root / "var/lib/quiver/quiver.duckdb"), read_only=True)
    try:
        return [
            r[0]
            for r in con.execute("SELECT name FROM _quiver.schema_migrations ORDER BY version").fetchall()
        ]
    finally:
        con.close()


def check_upgrade_rollback(root: Path, work: Path) -> None:
    """After site.yml ran with the upgrade wheel (deploy_test.sh): the pre-upgrade
    snapshot and the record exist, the new release migrates when it starts, and
    rollback.yml switches back and restores the snapshot."""
    print("upgrade and rollback", flush=True)
    record_file = root / "opt/quiver/releases/upgrade.json"
    check(record_file.exists(), "site.yml recorded the upgrade", record_file)
    if not record_file.exists():
        return
    record = json.loads(record_file.read_text())
    venv = root / "opt/quiver/venv"
    check(os.readlink(venv) == record["to"] != record["from"], "the upgrade release is current", record)
    snapshot = root / record["snapshot"].lstrip("/")
    check(
        snapshot.is_file() and snapshot.parent.name == "pre-upgrade",
        "a pre-upgrade snapshot was taken before the switch",
        record["snapshot"],
    )
    r = chroot(
        root,
        "/opt/quiver/venv/bin/python",
        "-c",
        "import importlib.metadata as m; print(m.version('quiver'))",
    )
    check(r.stdout.strip().endswith("+upgrade"), "the new release is installed", r.stdout + r.stderr)

    log = work / "quiver-upgraded.log"
    log.write_text("")
    server = Running(root, log)
    admin = (root / "var/lib/quiver/admin.token").read_text().strip()
    try:
        with http(root, server) as client:
            r = get(
                client,
                "/v1/swarms",
                admin,
                method="POST",
                json={"name": "after-upgrade", "tables": ["demo.*"]},
            )
            check(r.status_code == 201, "the upgraded Quiver serves (swarm 'after-upgrade' created)", r.text)
    finally:
        server.stop()
    check("0999_deploy_test_upgrade" in migrations(root), "the new release migrated the schema")

    r = ansible("rollback.yml")
    check(r.returncode == 0, "rollback.yml", r.stdout[-3000:] + r.stderr[-2000:])
    check("the schema moved" in r.stdout, "rollback.yml saw the schema move", r.stdout[-2000:])
    check(os.readlink(venv) == record["from"], "the previous release is current again", os.readlink(venv))
    check("0999_deploy_test_upgrade" not in migrations(root), "the pre-upgrade database is back")
    r = ansible("rollback.yml")
    check(
        r.returncode != 0 and "Nothing to roll back" in r.stdout,
        "a second rollback.yml refuses (nothing to roll back)",
        r.stdout[-1500:] + r.stderr[-1500:],
    )

    log = work / "quiver-rolled-back.log"
    log.write_text("")
    server = Running(root, log)
    try:
        with http(root, server) as client:
            r = get(client, "/v1/swarms/drill", admin)
            check(
                r.status_code == 200, "after the rollback: the previous release serves the old state", r.text
            )
            r = get(client, "/v1/swarms/after-upgrade", admin)
            check(
                r.status_code == 404, "…as of the snapshot (the swarm made after the upgrade is gone)", r.text
            )
    finally:
        server.stop()


def main(root: Path, upgrade_rollback: bool = False) -> int:
    work = root.parent
    started = time.monotonic()
    if upgrade_rollback:
        with mounted_proc(root):
            check_upgrade_rollback(root, work)
        print(json.dumps({"checks_failed": failures, "seconds": round(time.monotonic() - started, 1)}))
        return 1 if failures else 0
    check_static(root)
    with mounted_proc(root):
        check_live(root, work)
    print(json.dumps({"checks_failed": failures, "seconds": round(time.monotonic() - started, 1)}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]).resolve(), "--upgrade-rollback" in sys.argv[2:]))
