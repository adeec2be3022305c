# Quiver in a container -- an alternative to ansible/ for those who prefer containers.
# Untested here: the build machine has no Docker engine. `make test` lints this file with
# hadolint; see ansible/README.md ("Container") for how to run it.
#
#   docker build -t quiver .
#   docker run -d -p 8815:8815 -p 8000:8000 -v quiver-data:/var/lib/quiver quiver
#   (with TLS: mount the files and set QUIVER_TLS_CERT_FILE / QUIVER_TLS_KEY_FILE)

# --- build: the wheel and every dependency as wheels, pinned by constraints.txt ----------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY quiver ./quiver
COPY catalog ./catalog
COPY flight_server ./flight_server
COPY quiver_client ./quiver_client
COPY control_plane ./control_plane
COPY sync ./sync
COPY mcp_server ./mcp_server
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt /dist/quiver-*.whl

# --- run: a venv from those wheels only, as an unprivileged user -------------------------
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 quiver \
    && useradd --system --uid 10001 --gid quiver --home-dir /var/lib/quiver --shell /usr/sbin/nologin quiver \
    && mkdir -p /var/lib/quiver \
    && chown quiver:quiver /var/lib/quiver \
    && chmod 0700 /var/lib/quiver
COPY --from=build /wheels /wheels
RUN python -m venv /opt/quiver \
    && /opt/quiver/bin/pip install --no-cache-dir --no-index --find-links /wheels quiver \
    && rm -rf /wheels
ENV PATH=/opt/quiver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    QUIVER_SERVER_HOST=0.0.0.0 \
    QUIVER_SERVER_DATA_DIR=/var/lib/quiver \
    QUIVER_SERVER_LOG_FORMAT=json
VOLUME ["/var/lib/quiver"]
USER 10001:10001
WORKDIR /var/lib/quiver
EXPOSE 8815 8000
# Liveness on loopback: TLS when a certificate is configured (not verified -- only the
# status is read, no credential is sent).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request as u; scheme = 'https' if os.environ.get('QUIVER_TLS_CERT_FILE') else 'http'; port = os.environ.get('QUIVER_SERVER_HTTP_PORT', '8000'); r = u.urlopen(f'{scheme}://127.0.0.1:{port}/healthz', timeout=4, context=ssl._create_unverified_context()); sys.exit(0 if r.status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["quiver"]
CMD ["serve"]
