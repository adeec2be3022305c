"""One load run (tests/load): the server, the swarms and tokens, the agents, the report.
``python -m tests.load`` (``__main__``) is its command line; tests call :func:`run` directly.
"""

from __future__ import annotations

import os
import platform
import resource
import secrets
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec

from catalog.config import LimitsConfig
from quiver.demo import sizes
from quiver_client import QuiverClient
from tests.harness import wait_until
from tests.load.agents import (
    CALL_TIMEOUT_SECONDS,
    HOSTILE_KINDS,
    GoodAgent,
    HostileAgent,
    Recorder,
    Run,
    Tables,
    hostile_kinds,
)
from tests.load.report import Memory, Report, op_stats
from tests.load.server import GIB, ROOT, LoadServer, exit_description, proc_status

DEFAULT_OUTPUT = ROOT / "tests" / "bench" / "LOAD.md"
# Well-behaved agents alternate between two swarms with different allowlists.
SWARMS: dict[str, list[str]] = {
    "load-all": ["demo.customers", "demo.events", "demo.orders"],
    "load-sales": ["demo.customers", "demo.orders"],
}
HOSTILE_SWARM = "load-hostile"
EXPIRED_TTL_SECONDS = 1


class LoadConfig(msgspec.Struct, kw_only=True):
    seconds: float = 60.0
    agents: int = 32
    hostile: int = 4
    hostile_kinds: list[str] = msgspec.field(default_factory=lambda: list(HOSTILE_KINDS))
    scale: float = 0.1
    settings: dict[str, str] = msgspec.field(default_factory=dict)
    memory_cap_gib: float = 6.0
    command: str = "python -m tests.load"


def _mint(admin: httpx.Client, swarm: str, agent: str, ttl: int | None = None) -> dict[str, str]:
    body: dict[str, object] = {"kind": "agent", "swarm": swarm, "agent": agent}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    r = admin.post("/v1/tokens", json=body)
    if r.status_code != 201:
        raise RuntimeError(f"minting a token for {swarm}/{agent} failed: {r.status_code} {r.text[:300]}")
    return dict(r.json())


def _setup(
    admin: httpx.Client, cfg: LoadConfig
) -> tuple[list[tuple[str, list[str]]], list[str], dict[str, str]]:
    """Swarms and tokens through the control plane: (token, readable tables) per good agent,
    a token per hostile agent, and the hostile agents' bad tokens (the "expired" one expires
    within ``EXPIRED_TTL_SECONDS``: :func:`_refused_as_expired` tells when)."""
    for name, tables in {**SWARMS, HOSTILE_SWARM: ["demo.customers", "demo.orders"]}.items():
        r = admin.post("/v1/swarms", json={"name": name, "description": "load test", "tables": tables})
        if r.status_code != 201:
            raise RuntimeError(f"creating swarm {name} failed: {r.status_code} {r.text[:300]}")
    names = list(SWARMS)
    good = []
    for i in range(cfg.agents):
        swarm = names[i % len(names)]
        good.append((_mint(admin, swarm, f"agent-{i}")["token"], SWARMS[swarm]))
    hostile = [_mint(admin, HOSTILE_SWARM, f"hostile-{i}")["token"] for i in range(cfg.hostile)]
    expiring = _mint(admin, HOSTILE_SWARM, "expired", ttl=EXPIRED_TTL_SECONDS)
    revoked = _mint(admin, HOSTILE_SWARM, "revoked")
    r = admin.delete(f"/v1/tokens/{revoked['jti']}")
    if r.status_code != 200:
        raise RuntimeError(f"revoking a token failed: {r.status_code} {r.text[:300]}")
    _, _, signature = revoked["token"].rpartition(".")
    forged = _mint(admin, HOSTILE_SWARM, "forged")["token"].rpartition(".")[0] + "." + signature
    bad = {
        "garbage": secrets.token_urlsafe(32),
        "long-garbage": secrets.token_urlsafe(3000),
        "forged-signature": forged,
        "expired": expiring["token"],
        "revoked": revoked["token"],
    }
    return good, hostile, bad


def _refused_as_expired(server: LoadServer, token: str) -> bool:
    """Whether the server refuses ``token`` because it expired (by the server's own clock)."""
    r = httpx.get(f"{server.http_url}/v1/whoami", headers={"authorization": f"Bearer {token}"}, timeout=30)
    return r.status_code == 401 and "expired" in r.json().get("detail", "")


def _survives(server: LoadServer, token: str) -> bool:
    """The server still serves after the load: a query, whoami and the health check answer."""
    if not server.alive:
        return False
    try:
        with QuiverClient(server.flight_url, token, timeout=30) as client:
            client.whoami()
            if client.query("SELECT count(*) AS n FROM demo.customers").num_rows != 1:
                return False
        return httpx.get(f"{server.http_url}/healthz", timeout=30).status_code == 200
    except Exception:
        return False


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run(cfg: LoadConfig, work: Path) -> Report:
    """Start the server, run the agents for ``cfg.seconds``, stop everything; the report."""
    load_before = os.getloadavg()
    server = LoadServer(
        work,
        scale=cfg.scale,
        settings=cfg.settings,
        memory_cap_bytes=int(cfg.memory_cap_gib * GIB),
    )
    try:
        try:
            with server.admin() as admin:
                good, hostile, bad = _setup(admin, cfg)
            wait_until(
                lambda: _refused_as_expired(server, bad["expired"]),
                30,
                0.1,
                what="the short-lived token to expire",
            )
        except (httpx.HTTPError, RuntimeError) as e:
            if server.alive:
                raise
            raise RuntimeError(
                f"{server.death() or 'the server exited'} during the setup ({e}):\n{server.log_tail()}"
            ) from e
        n = sizes(cfg.scale)
        stop = threading.Event()
        server.on_death = stop.set
        recorder = Recorder()
        shared = Run(
            server.flight_url,
            server.http_url,
            recorder.started + cfg.seconds,
            stop,
            recorder,
            Tables(n["customers"], n["orders"], n["events"]),
        )
        agents: list[GoodAgent | HostileAgent] = [
            GoodAgent(shared, i, token, tables) for i, (token, tables) in enumerate(good)
        ]
        agents += [
            HostileAgent(shared, i, token, bad, hostile_kinds(i, cfg.hostile, cfg.hostile_kinds))
            for i, token in enumerate(hostile)
        ]
        rss_start = server.rss_now()
        cpu_start, own_start = server.cpu_now(), _own_cpu()
        load_started = server.load_started = time.monotonic()
        threads = [
            threading.Thread(target=a, name=f"load-agent-{i}", daemon=True) for i, a in enumerate(agents)
        ]
        for t in threads:
            t.start()
        join_by = shared.deadline + CALL_TIMEOUT_SECONDS + 15
        for t in threads:
            t.join(max(0.1, join_by - time.monotonic()))
        stop.set()
        wall = time.monotonic() - load_started
        stuck = sum(t.is_alive() for t in threads)
        rss_end = server.rss_now()
        server_cpu, own_cpu = server.cpu_now() - cpu_start, _own_cpu() - own_start
        survived = _survives(server, good[0][0]) if good else server.alive
        final = proc_status(server.pid)
        offset = load_started - server.started_at
        window = [(t - offset, b) for t, b in server.samples if offset <= t]
        memory = Memory(
            start=rss_start,
            peak=max([b for _, b in window] + [rss_start, rss_end]),
            end=rss_end,
            hwm=final.get("VmHWM") or server.last_status.get("VmHWM", 0),
            vm_peak=final.get("VmPeak") or server.last_status.get("VmPeak", 0),
            samples=_per_second(window),
        )
        death = server.death()
    finally:
        code = server.stop()
    death = death or server.death()
    samples = recorder.samples
    defaults = LimitsConfig()
    cap = int(cfg.settings.get("limits.max_concurrent_queries", defaults.max_concurrent_queries))
    timeout = float(cfg.settings.get("limits.query_timeout_seconds", defaults.query_timeout_seconds))
    # Rates are per second of load: the configured duration, or less when the server died.
    rate_seconds = max(0.001, min(cfg.seconds, wall))
    good_samples = [s for s in samples if not s.hostile]
    failed = sorted((s for s in good_samples if s.outcome != "ok"), key=lambda s: s.at)
    first_error = f"t={failed[0].at:.1f}s {failed[0].op} {failed[0].outcome}" if failed else None
    config = {
        "seconds": f"{cfg.seconds:g}",
        "agents": str(cfg.agents),
        "hostile": str(cfg.hostile),
        "hostile kinds": ",".join(cfg.hostile_kinds),
        "demo scale": f"{cfg.scale:g} (customers {n['customers']:,}, orders {n['orders']:,}, "
        f"events {n['events']:,})",
        "server settings": ", ".join(f"{k}={v}" for k, v in cfg.settings.items()) or "defaults",
        "address-space cap": f"{cfg.memory_cap_gib:g} GiB" if cfg.memory_cap_gib > 0 else "none",
        "commit": _git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    return Report(
        date=f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        command=cfg.command,
        config=config,
        load_before=load_before,
        load_after=os.getloadavg(),
        seconds=cfg.seconds,
        wall_seconds=wall,
        ops=op_stats(samples, rate_seconds, slow_seconds=1.5 * timeout + 2),
        good_requests=len(good_samples),
        good_errors=sum(s.outcome != "ok" for s in good_samples),
        good_per_second=len(good_samples) / rate_seconds,
        hostile_requests=len(samples) - len(good_samples),
        memory=memory,
        survived=survived and death is None,
        death=death,
        server_exit=exit_description(code),
        log_tail=server.log_tail() if death else "",
        server_errors=server.logged_errors(),
        stuck_agents=stuck,
        first_good_error=first_error,
        reuse_peak=max(recorder.reuse_peaks, default=0),
        reuse_rounds=len(recorder.reuse_peaks),
        reuse_over_cap=sum(p > cap for p in recorder.reuse_peaks),
        concurrency_cap=cap,
        server_cpu_seconds=server_cpu,
        generator_cpu_seconds=own_cpu,
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_second(samples: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """About one sample a second (the first of each second), for the report."""
    out: list[tuple[float, int]] = []
    for t, b in samples:
        if not out or int(t) > int(out[-1][0]):
            out.append((round(t, 1), b))
    return out
