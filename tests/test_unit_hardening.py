"""The deployed unit sets ``MemoryDenyWriteExecute=true`` (ansible/roles/quiver): that is
safe only if nothing in the process -- DuckDB, pyarrow's compute kernels, gRPC, OpenSSL,
cffi/ctypes -- ever maps memory writable and executable. Checked here by running a real
``quiver serve`` (TLS on both listeners, demo data) under the kernel's own equivalent,
``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`` (Linux 6.3+; inherited by threads and
kept across exec), and driving a query workload through it: scans, SQL with aggregates,
regular expressions, JSON and time functions, samples, the control plane and a backup.

The same workload under ``strace -f`` checks the unit's ``SystemCallFilter=``: every
system call Quiver makes is in the allowed set."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.harness import DEMO_SCALE, call_options, wait_until
from tests.test_tls import make_certificates

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

# Turn MDWE on, prove it is enforced (a W+X mapping must fail), then become quiver serve.
WRAPPER = """
import ctypes, mmap, runpy, sys

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("mdwe-unsupported", ctypes.get_errno(), flush=True)
    sys.exit(3)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("mdwe-enforced", flush=True)
else:
    print("mdwe-not-enforced", flush=True)
    sys.exit(4)
sys.argv = ["quiver", *sys.argv[1:]]
runpy.run_module("quiver", run_name="__main__", alter_sys=True)
"""


def _cmd(body: dict[str, object]) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def test_quiver_works_with_memory_deny_write_execute(tmp_path: Path) -> None:
    _workload(tmp_path, [sys.executable, "-c", WRAPPER], mdwe=True)


def test_quiver_works_with_proc_subset_pid(tmp_path: Path) -> None:
    """The unit's ``ProcSubset=pid`` and ``ProtectProc=invisible``: /proc shows only the
    process's own entries (no /proc/sys, /proc/meminfo, /proc/stat; gRPC, DuckDB and the
    allocators read some of those and must fall back). Reproduced with a private mount
    and PID namespace and proc mounted ``subset=pid,hidepid=invisible``, MDWE on as well."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for a private /proc mount")
    mount = 'mount -t proc -o subset=pid,hidepid=invisible proc /proc && test ! -e /proc/sys && exec "$@"'
    prefix = ["unshare", "-m", "-p", "-f", "--propagation", "private", "sh", "-c", mount, "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /proc here (no CAP_SYS_ADMIN?): {probe.stderr.strip()[:200]}")
    _workload(tmp_path, [*prefix, sys.executable, "-c", WRAPPER], mdwe=True)


UNIT = Path(__file__).resolve().parent.parent / "ansible/roles/quiver/templates/quiver.service.j2"


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, timeout=60
    ).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.split()[0])
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= _expand(groups[name], groups) if name.startswith("@") else {name}
    return found


def test_quiver_needs_only_the_system_calls_the_unit_allows(tmp_path: Path) -> None:
    """The unit's SystemCallFilter= lines, expanded by this machine's systemd, against
    every system call a traced ``quiver serve`` (and this test's clients) made during the
    workload: a call outside the filter would fail with EPERM under systemd."""
    if shutil.which("strace") is None or shutil.which("systemd-analyze") is None:
        pytest.skip("needs strace and systemd-analyze (apt-get install strace systemd)")
    groups = _syscall_groups()
    allowed: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1].split()
            if value[0].startswith("~"):
                allowed -= _expand([value[0][1:], *value[1:]], groups)
            else:
                allowed |= _expand(value, groups)
    assert "read" in allowed and "mount" not in allowed, sorted(allowed)[:20]
    summary = tmp_path / "strace.txt"
    _workload(
        tmp_path, ["strace", "-f", "-c", "-o", str(summary), sys.executable, "-m", "quiver"], mdwe=False
    )
    used = {
        parts[-1]
        for parts in (line.split() for line in summary.read_text().splitlines())
        if len(parts) >= 5
        and re.fullmatch(r"[a-z0-9_]+", parts[-1])
        and parts[-1] not in {"syscall", "total"}
    }
    assert len(used) > 30, summary.read_text()
    assert not used - allowed, f"system calls the unit's filter refuses: {sorted(used - allowed)}"


def _workload(tmp_path: Path, prefix: list[str], *, mdwe: bool) -> None:
    """quiver serve (TLS, demo data) started with ``prefix``, driven through scans, SQL,
    samples, the control plane and a backup, then stopped with SIGTERM (exit 0)."""
    ca, cert, key = make_certificates(tmp_path / "pki")
    log = tmp_path / "quiver.log"
    env = {
        **os.environ,
        "QUIVER_DEMO_SCALE": str(DEMO_SCALE),
        "QUIVER_TLS_CERT_FILE": str(cert),
        "QUIVER_TLS_KEY_FILE": str(key),
        "QUIVER_SERVER_HOST": "127.0.0.1",
        "QUIVER_SERVER_LOG_FORMAT": "json",
    }
    argv = ["serve", "--demo", "--data-dir", str(tmp_path / "data"), "--flight-port", "0", "--http-port", "0"]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*prefix, *argv],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        if mdwe:
            first = proc.stdout.readline().strip()
            if first == "mdwe-unsupported":
                pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
            assert first == "mdwe-enforced", (first, log.read_text()[-3000:])

        def has_started() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return '"quiver.started"' in log.read_text()

        wait_until(has_started, 90, 0.1, what="quiver serve to start")
        started = next(
            json.loads(line) for line in log.read_text().splitlines() if '"quiver.started"' in line
        )
        data = tmp_path / "data"
        admin = (data / "admin.token").read_text().strip()
        agent = (data / "demo-agent.token").read_text().strip()

        client = flight.FlightClient(started["flight"], tls_root_certs=ca.read_bytes())
        opts = call_options(agent, timeout=120)

        def fetch(descriptor: flight.FlightDescriptor, o: flight.FlightCallOptions = opts) -> pa.Table:
            info = client.get_flight_info(descriptor, o)
            return pa.concat_tables([client.do_get(e.ticket, o).read_all() for e in info.endpoints])

        events = fetch(flight.FlightDescriptor.for_path("demo", "events"))
        assert events.num_rows == 50_000
        sql = """
            SELECT c.country, count(*) AS n, sum(o.amount) AS total,
                   approx_quantile(o.amount, 0.9) AS p90,
                   max(regexp_replace(c.name, '[aeiou]+', '_', 'g')) AS mangled,
                   max(strftime(o.ordered_at, '%Y-%m')) AS last_month,
                   max(json_object('k', o.order_id)::VARCHAR) AS j
            FROM demo.orders o JOIN demo.customers c USING (customer_id)
            GROUP BY ALL ORDER BY n DESC
        """
        result = fetch(_cmd({"kind": "query", "sql": sql}))
        assert result.num_rows > 0 and result.column_names[:2] == ["country", "n"]
        assert sum(result.column("n").to_pylist()) == 20_000
        sample = fetch(
            _cmd({"kind": "sample", "table": "demo.orders", "rows": 100, "method": "random", "seed": 1})
        )
        assert sample.num_rows == 100

        client.close()

        with httpx.Client(
            base_url=started["http"], verify=ssl.create_default_context(cafile=str(ca)), timeout=30
        ) as http:
            assert http.get("/healthz").status_code == 200
            headers = {"authorization": f"Bearer {admin}"}
            assert http.get("/v1/status", headers=headers).status_code == 200
            assert http.get("/metrics", headers=headers).status_code == 200
            assert http.post("/v1/backup", headers=headers).status_code in (200, 201)

        # Under strace or unshare, signal the quiver process itself (the wrapper then
        # exits with its status); a signal to strace would end the trace instead.
        target = proc.pid
        if prefix[0] in ("strace", "unshare"):
            target = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(target, signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
