"""The process wiring of ``quiver serve``: one catalog, the Flight listener and the control
plane side by side, a housekeeping thread, and a clean stop.

The components never reach into each other: the runtime builds them in order (catalog,
Flight server, sync service), assembles one :class:`quiver.status.ProcessStatus` from them
(each /v1/status section named with its source) and hands it, with the sync service as the
control plane's ``catalog.SyncControl``, to ``control_plane.create_app`` explicitly.

Under systemd (``Type=notify``, ``NOTIFY_SOCKET`` set) the process says ``READY=1`` once
both listeners accept, ``WATCHDOG=1`` after every housekeeping pass (at least twice per
``WatchdogSec=``, so a hung -- not crashed -- process is restarted) and ``STOPPING=1`` when
it begins to stop; see :func:`sd_notify`.

Stopping (SIGINT/SIGTERM or :meth:`Runtime.stop`): health turns 503, the HTTP listener stops
accepting, the Flight listener lets in-flight calls finish for ``grace`` seconds and then
interrupts the DuckDB queries still streaming, buffered bookkeeping is flushed, and the
database is checkpointed and closed.
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import structlog
import uvicorn

from catalog import Catalog, Config, QuiverError
from catalog.clock import SYSTEM_CLOCK, Clock
from catalog.resources import AddressSpaceBound
from catalog.snapshot_crypto import load_key
from control_plane import create_app
from flight_server import QuiverFlightServer
from quiver import demo, logs
from quiver.status import ProcessStatus, Sections, sync_section

if TYPE_CHECKING:
    from sync import SyncService

log = structlog.get_logger("quiver")


def _client_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - not a bind


def _accepts(host: str, port: int) -> bool:
    """A TCP connect to the listener: cheap, and true only while it really serves."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class ListenError(QuiverError):
    """A listener cannot bind its address: said in one line naming the port and the flag or
    configuration key that changes it (raised before anything is left half-started)."""

    code = "UNAVAILABLE"
    http_status = 503


# Listener -> (what it is, its CLI flag, its configuration key).
_LISTENERS = {
    "flight": ("Arrow Flight", "--flight-port", "[server] flight_port"),
    "http": ("control plane", "--http-port", "[server] http_port"),
}


def _listen_error(listener: str, host: str, port: int, err: OSError) -> ListenError:
    what, flag, key = _LISTENERS[listener]
    shown = f"[{host}]" if ":" in host else host
    if err.errno == errno.EADDRINUSE:
        why = "is already in use (another Quiver, or another program, listens there)"
    elif err.errno == errno.EACCES:
        why = "needs privileges (ports below 1024 need CAP_NET_BIND_SERVICE)"
    elif err.errno == errno.EADDRNOTAVAIL:
        return ListenError(
            f"cannot listen on {shown}:{port} for the {what}: {host} is not an address of this "
            "machine; change --host or [server] host"
        )
    else:
        why = f"cannot be bound ({err.strerror})"
    return ListenError(f"port {port} on {shown} for the {what} {why}; choose another with {flag} or {key}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_port(listener: str, host: str, port: int) -> None:
    """Bind and release the port the way the listener will (SO_REUSEADDR, as gRPC and our
    HTTP socket do), so a busy port is reported before the database is even opened."""
    if port == 0:
        return
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise _listen_error(listener, host, port, e) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches only this machine (a wildcard reaches every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


CLEARTEXT_WARNING = (
    "listening on {host} without [tls]: bearer tokens travel in clear text; "
    "set [tls] cert_file and key_file, or listen on 127.0.0.1 behind a TLS proxy"
)


def sd_notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's notification socket.

    The protocol is one datagram on the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path,
    or ``@name`` for the abstract namespace), so no dependency is needed. Without
    ``NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) it does nothing and returns
    False; a socket that cannot be reached is logged once per call, never raised: telling
    systemd is best effort and must not take the service down.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify.failed", state=state.split("=", 1)[0], error=str(e))
        return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of systemd's ``WatchdogSec=`` (from ``WATCHDOG_USEC``), or None when no watchdog
    is asked for this process (``WATCHDOG_PID``, when set, must be ours)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6 / 2


@dataclass
class Endpoints:
    flight_url: str
    http_url: str


def _freeze_startup_objects() -> None:
    """Move everything alive once the process has started — modules, the catalog, the
    listeners, their caches as built — out of the garbage collector's reach (``gc.freeze``).

    Python's full collection walks every tracked object while it holds the GIL. A started
    server holds ~150,000 (pyarrow, DuckDB, Litestar, msgspec and Quiver's own), and the
    objects that requests leave behind (cache entries, tickets, parse trees) set off a full
    collection every thousand point queries or so: a pause of 30 ms to 0.3 s in which no
    request runs Python (measured with ``gc.callbacks`` on the 2-core VM, tests/bench/RESULTS.md).
    Frozen objects are still freed when their last reference goes; only a reference cycle
    among them would outlive the process's run, and they are built once. ``Runtime.stop``
    unfreezes them."""
    gc.collect()
    gc.freeze()


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        demo_data: bool = False,
        grace_seconds: float = 10.0,
        address_space: AddressSpaceBound | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        # What token and ticket expiry read (catalog/clock.py): the host's clocks, or a
        # test's clock that it moves by hand.
        self.clock = clock
        # quiver serve's address-space bound (catalog/resources.py): set once both listeners
        # serve, and kept current by housekeeping. None in-process (tests, embedding).
        self.address_space = address_space
        self.demo_data = demo_data
        self.grace_seconds = grace_seconds
        self.catalog: Catalog | None = None
        self.flight: QuiverFlightServer | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._housekeeping: threading.Thread | None = None
        self._janitor: threading.Thread | None = None
        self.sync: SyncService | None = None  # when [[sync.tables]] are configured
        # /v1/status and /healthz, assembled from the components above once they exist.
        self.status: ProcessStatus | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.endpoints: Endpoints | None = None
        self.admin_token_path: str | None = None
        self.demo_token_path: str | None = None
        # Said at start-up in the log and the banner (e.g. clear-text bearer tokens).
        self.warnings: list[str] = []

    # --- start ---------------------------------------------------------------------------
    def start(self) -> Endpoints:
        cfg = self.config
        server = cfg.server
        _check_port("flight", server.host, server.flight_port)
        _check_port("http", server.host, server.http_port)
        if not cfg.tls.enabled and not is_loopback(server.host):
            warning = CLEARTEXT_WARNING.format(host=server.host or "every address")
            self.warnings.append(warning)
            log.warning("server.cleartext", host=server.host, detail=warning)
        key_file = cfg.backup_key_file
        if key_file is not None:
            # Said now, not first at the nightly backup (which fails visibly too).
            try:
                load_key(key_file)
            except QuiverError as e:
                self.warnings.append(f"backups will fail: {e.detail}")
                log.warning("backup.key_unusable", detail=e.detail)
        catalog = self.catalog = Catalog(cfg, clock=self.clock)
        catalog.metrics.set_log_drops_source(logs.dropped_records)
        try:
            if self.demo_data:
                demo.seed(catalog)
                self.demo_token_path = str(catalog.data_dir / "demo-agent.token")
            written = catalog.ensure_admin_token()
            self.admin_token_path = str(catalog.data_dir / "admin.token")
            if written is None:
                log.info("admin_token.present", path=self.admin_token_path)
            self._start_flight(catalog)
            self.sync = self._build_sync(catalog)
            self.status = self._assemble_status(catalog)
            self._start_http(catalog, self.status)
            if self.sync is not None:
                self.sync.start()
        except BaseException:
            self.stop()
            raise
        if self.address_space is not None:
            self.address_space.apply()
        assert self.endpoints is not None
        log.info("quiver.started", flight=self.endpoints.flight_url, http=self.endpoints.http_url)
        # The line that says how to connect is written before anyone is told we are ready
        # (the log writer is a background thread: quiver/logs.py).
        logs.flush()
        # Both listeners accept now (_start_http waits for uvicorn; gRPC binds in its
        # constructor): systemd may order dependants after us and start the watchdog, which
        # the housekeeping passes started next feed (so READY=1 always comes first).
        sd_notify("READY=1")
        self._housekeeping = threading.Thread(target=self._housekeep, name="quiver-housekeeping", daemon=True)
        self._housekeeping.start()
        self._janitor = threading.Thread(
            target=self._sweep_artefacts, name="quiver-artefact-janitor", daemon=True
        )
        self._janitor.start()
        _freeze_startup_objects()
        return self.endpoints

    def _tls(self) -> tuple[bytes, bytes] | None:
        """The PEM certificate chain and key of ``[tls]``, or None for plain listeners.

        Read once at start-up (gRPC and uvicorn both load them then): a renewed certificate
        takes effect on the next restart, which is what the deployment's renewal hook does.
        """
        tls = self.config.tls
        if not (tls.cert_file and tls.key_file):
            return None
        cert = Path(tls.cert_file).expanduser().read_bytes()
        key = Path(tls.key_file).expanduser().read_bytes()
        return cert, key

    def _start_flight(self, catalog: Catalog) -> None:
        cfg = self.config.server
        tls = self._tls()
        scheme = "grpc+tls" if tls else "grpc+tcp"
        try:
            self.flight = QuiverFlightServer(
                catalog,
                f"{scheme}://{cfg.host}:{cfg.flight_port}",
                tls_certificates=[tls] if tls else None,
            )
        except pa.ArrowException as e:
            # gRPC says only "Server did not start properly" (its own log line names the
            # bind error): the port became busy after the check in start(), or the address
            # cannot be bound. Ask the socket layer which, for one line naming the port.
            _check_port("flight", cfg.host, cfg.flight_port)
            raise ListenError(
                f"the Arrow Flight listener on port {cfg.flight_port} did not start: {e}"
            ) from None
        catalog.queries = self.flight.query_runner  # POST /v1/query runs agent SQL through it
        port = self.flight.port
        host = cfg.advertise_host or _client_host(cfg.host)
        public_scheme = "grpc+tls" if tls else "grpc"
        self._flight_url = f"{public_scheme}://{host}:{port}"

    def _build_sync(self, catalog: Catalog) -> SyncService | None:
        """The sync scheduler runs in this process (DuckDB allows one writer); built before the
        control plane, which is handed it, and started once both listeners serve."""
        if not self.config.sync.tables:
            return None
        from sync import SyncService

        service = SyncService(catalog, self.config)
        catalog.metrics.set_sync_source(service.metric_samples)  # quiver_sync_* at each scrape
        return service

    def _assemble_status(self, catalog: Catalog) -> ProcessStatus:
        """GET /v1/status and /healthz from what this process started: each section names the
        component that answers it. The Flight listener is up (its constructor bound it)."""
        flight = self.flight
        assert flight is not None
        status = ProcessStatus(
            catalog,
            Sections(
                queries=flight.queries_status,
                cache=flight.cache_status,
                profiles=flight.profiles_status,
                async_queries=flight.async_queries_status,
                sync=sync_section(self.sync),
                backup=catalog.backups.status,
                artefacts=catalog.artefacts.status,
            ),
        )
        cfg = self.config.server
        probe_host, port = _client_host(cfg.host), flight.port
        status.listener_up("flight", self._flight_url, probe=lambda: _accepts(probe_host, port))
        return status

    def _start_http(self, catalog: Catalog, status: ProcessStatus) -> None:
        cfg = self.config.server
        sock = socket.socket(_family(cfg.host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.http_port))
        except OSError as e:
            sock.close()
            raise _listen_error("http", cfg.host, cfg.http_port, e) from None
        sock.listen(128)
        port = sock.getsockname()[1]
        tls = self.config.tls
        # uvicorn wraps the sockets passed to run() with this SSL context too, so the
        # listener serves TLS only: a plain-HTTP request fails the handshake.
        mounts, lifespans = [], []
        if self.config.mcp.enabled and self.flight is not None:
            from mcp_server.http import McpHttp

            # The tools run agent SQL through the data plane's query path, handed over here.
            mcp = McpHttp(
                catalog,
                self.flight.query_runner,
                self.config.mcp,
                listen_host=cfg.host,
                advertise_host=cfg.advertise_host,
            )
            mounts.append(mcp.route_handler())
            lifespans.append(mcp.lifespan)
        # An admin's list and cancel of running queries are the data plane's, handed over here.
        running = self.flight.running_queries() if self.flight is not None else None
        app = create_app(
            catalog, report=status, sync=self.sync, running=running, mounts=mounts, lifespans=lifespans
        )
        logs.reclaim_root()  # Litestar's default logging config replaced the root handler
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                # On: the MCP session manager runs in the app's lifespan (mcp_server/http.py).
                lifespan="on",
                timeout_graceful_shutdown=int(self.grace_seconds),
                server_header=False,
                ssl_certfile=str(Path(tls.cert_file).expanduser()) if tls.cert_file else None,
                ssl_keyfile=str(Path(tls.key_file).expanduser()) if tls.key_file else None,
            )
        )
        self._http = server
        self._http_thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="quiver-http", daemon=True
        )
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP listener did not start; see the log above")
            time.sleep(0.01)
        host = cfg.advertise_host or _client_host(cfg.host)
        http_url = f"{'https' if tls.enabled else 'http'}://{host}:{port}"
        status.listener_up("http", http_url)
        self.endpoints = Endpoints(flight_url=self._flight_url, http_url=http_url)

    def _housekeep(self) -> None:
        """Flush bookkeeping and keep DATA_DIR/admin.token renewed. The pass runs at least
        four times per renewal window, so the file never holds a token with less than
        about three quarters of ``admin_token_renew_fraction`` of its lifetime left."""
        assert self.catalog is not None
        tokens = self.config.tokens
        window = tokens.admin_ttl_seconds * tokens.admin_token_renew_fraction
        interval = min(tokens.last_used_flush_seconds, window / 4)
        # The watchdog is fed only after a completed pass: a pass stuck on the database
        # (or a deadlocked process) stops the pings, and systemd restarts Quiver.
        watchdog = watchdog_interval()
        if watchdog is not None:
            interval = min(interval, watchdog)
        while not self._stopping.wait(interval):
            self.catalog.maintain()
            self.catalog.renew_admin_token()
            if self.address_space is not None:
                self.address_space.apply()
            if watchdog is not None and self._listeners_accept():
                sd_notify("WATCHDOG=1")

    def _sweep_artefacts(self) -> None:
        """The artefact janitor (catalog/artefacts.py ``sweep``): once at start — what a
        crash left behind (half-written uploads, orphans) and what expired while Quiver was
        down — then every ``[artefacts] cleanup_interval_seconds``."""
        assert self.catalog is not None
        store = self.catalog.artefacts
        store.run_sweep()
        while not self._stopping.wait(self.config.artefacts.cleanup_interval_seconds):
            store.run_sweep()

    def _listeners_accept(self) -> bool:
        """The health probes of /healthz (a listener that stopped accepting connections
        stops the watchdog pings too)."""
        return self.status is not None and self.status.listeners_accept()

    # --- run until told to stop ---------------------------------------------------------------
    def serve_forever(self) -> None:
        """Block until SIGINT/SIGTERM (installed here: call from the main thread), then stop."""

        received: list[int] = []

        def on_signal(signum: int, _frame: Any) -> None:
            # Only set flags here: logging from a signal handler can deadlock on the
            # logger's lock held by the interrupted main thread.
            received.append(signum)
            self._stopping.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stopping.wait(0.5):
                pass
            if received:
                log.info("quiver.signal", signal=signal.Signals(received[0]).name)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()

    # --- stop ------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopping.set()
        sd_notify("STOPPING=1")
        catalog = self.catalog
        if self.status is not None:
            self.status.listeners_down()
        if self._http is not None:
            self._http.should_exit = True
        if self.flight is not None:
            flight = self.flight
            stopper = threading.Thread(target=flight.shutdown, name="quiver-flight-shutdown", daemon=True)
            stopper.start()
            stopper.join(self.grace_seconds)
            if stopper.is_alive() and catalog is not None:
                interrupted = catalog.db.interrupt_all()
                log.warning("flight.streams_interrupted", count=interrupted)
                stopper.join(self.grace_seconds)
        if self._http_thread is not None:
            self._http_thread.join(self.grace_seconds + 5)
        if self.sync is not None:
            self.sync.stop(self.grace_seconds)
        if self._janitor is not None:
            self._janitor.join(self.grace_seconds)
        if self._housekeeping is not None:
            # A pass in progress (a flush, an admin-token renewal) finishes before the
            # database closes under it; the thread sees _stopping and ends.
            self._housekeeping.join(self.grace_seconds)
        if catalog is not None:
            catalog.close()
        self._stopped.set()
        log.info("quiver.stopped")
        logs.flush()  # the background log writer's queue (quiver/logs.py): nothing left unwritten
        gc.unfreeze()  # what start froze may be collected again (a test process starts many)
