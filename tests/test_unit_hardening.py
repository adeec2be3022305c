"""The deployed unit sets ``MemoryDenyWriteExecute=true`` (ansible/roles/quiver): that is
safe only if nothing in the process -- DuckDB, pyarrow's compute kernels, gRPC, OpenSSL,
cffi/ctypes -- ever maps memory writable and executable. Checked here by running a real
``quiver serve`` (TLS on both listeners, demo data) under the kernel's own equivalent,
``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`` (Linux 6.3+; inherited by threads and
kept across exec), and driving a query workload through it: scans, SQL with aggregates,
regular expressions, JSON and time functions, samples, the control plane and a backup."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.harness import DEMO_SCALE, call_options
from tests.test_tls import make_certificates

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
            [sys.executable, "-c", WRAPPER, *argv],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first == "mdwe-unsupported":
            pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        assert first == "mdwe-enforced", (first, log.read_text()[-3000:])
        deadline = time.monotonic() + 90
        while '"quiver.started"' not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "quiver serve did not start"
            time.sleep(0.1)
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

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
