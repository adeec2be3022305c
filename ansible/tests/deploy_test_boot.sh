#!/usr/bin/env bash
# make deploy-test-boot: boot the root that `make deploy-test` configured with
# systemd-nspawn (its own network namespace: nothing it does reaches this machine's
# network or firewall), then, through the community.docker.nsenter connection:
#   - site.yml with services managed (quiver_start_services=true): UFW is enabled (in the
#     container's namespace), services started, the health check passes; a second run
#     changes nothing;
#   - inside the booted system (boot_check.py, Quiver's venv python): the hardened unit
#     serves TLS on 443 and 8815, port 80 redirects, fail2ban bans an address after
#     repeated bad tokens (read from the journal), the backup service writes a snapshot;
#   - restore.yml with real stop/start restores it, and the state is the snapshot's.
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$(pwd)
WORK=${DEPLOY_TEST_DIR:-$REPO/var/deploy-test}
ROOT=$WORK/rootfs
TOOLS=$REPO/.venv-ansible/bin
started=$(date +%s)
log() { printf '\n=== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }

if [ ! -L "$ROOT/opt/quiver/venv" ]; then
    echo "deploy-test-boot needs the root that make deploy-test configured ($ROOT)" >&2
    exit 1
fi
if ! command -v systemd-nspawn >/dev/null; then
    log "installing systemd-container"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-container
fi

# pebble (Debian's ACME test server) stands in for Let's Encrypt later; it and certbot
# (which site.yml installs with tls_mode=letsencrypt) are installed while the root still
# has this machine's network: the booted container has none.
chroot "$ROOT" apt-get install -y -q pebble certbot > "$WORK/boot-pebble-install.log" 2>&1

# The container resolves the certificate's name to itself; packages must not be blocked
# from starting services any more (this is a booted system now).
grep -q 'quiver.test' "$ROOT/etc/hosts" || echo '127.0.0.1 quiver.test' >> "$ROOT/etc/hosts"
rm -f "$ROOT/usr/sbin/policy-rc.d"

log "booting the root with systemd-nspawn"
mkdir -p /run/systemd/nspawn
unshare -m bash -c "mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn \
    --register=no --keep-unit --private-network --boot --directory='$ROOT'" \
    > "$WORK/boot-console.log" 2>&1 &
NSPAWN=$!
PID=""
shutdown_container() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        nsenter -t "$PID" -m -u -i -n -p systemctl poweroff >/dev/null 2>&1 || true
        for _ in $(seq 1 60); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 1; done
    fi
    kill "$NSPAWN" 2>/dev/null || true
    wait "$NSPAWN" 2>/dev/null || true
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
}
trap shutdown_container EXIT

for _ in $(seq 1 100); do
    PID=$(pgrep -P "$(pgrep -P "$NSPAWN" -x systemd-nspawn || echo "$NSPAWN")" -x systemd || true)
    [ -n "$PID" ] && break
    sleep 0.3
done
[ -n "$PID" ] || { cat "$WORK/boot-console.log"; echo "the container did not boot" >&2; exit 1; }
in_ct() { nsenter -t "$PID" -m -u -i -n -p -- "$@"; }
state=$(in_ct systemctl is-system-running --wait || true)
echo "container init pid $PID, system $state"

cat > "$REPO/ansible/tests/inventory/hosts.yml" <<EOF
---
# Written by deploy_test_boot.sh: the booted root, entered with nsenter.
quiver:
  hosts:
    deploy-test:
      ansible_connection: community.docker.nsenter
      ansible_nsenter_pid: $PID
      quiver_start_services: true
      fail2ban_ignore_loopback: false
EOF
unset PIP_FIND_LINKS
export PATH="$TOOLS:$PATH"
export ANSIBLE_HOME="$REPO/ansible/.ansible"
export ANSIBLE_FORCE_COLOR=0
playbook() {
    local name=$1
    shift
    (cd "$REPO/ansible" && ansible-playbook -i tests/inventory \
        --vault-password-file tests/vault-password.txt "$@") 2>&1 | tee "$WORK/$name.log"
}

log "site.yml on the booted system (services managed)"
playbook boot-run1 site.yml
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=[0-9]+ +unreachable=0 +failed=0' "$WORK/boot-run1.log"
log "site.yml again: must change nothing"
playbook boot-run2 site.yml
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=0 +unreachable=0 +failed=0' "$WORK/boot-run2.log" || {
    grep -E '^changed:' "$WORK/boot-run2.log" >&2
    exit 1
}

log "checks inside the booted system"
cp "$REPO/ansible/tests/boot_check.py" "$ROOT/root/boot_check.py"
in_ct /opt/quiver/venv/bin/python /root/boot_check.py before-restore | tee "$WORK/boot-check1.log"
snapshot=$(sed -n 's/^snapshot: //p' "$WORK/boot-check1.log")

log "restore.yml (Quiver stopped and started by systemd)"
playbook boot-restore restore.yml -e "restore_snapshot=$snapshot"
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=[0-9]+ +unreachable=0 +failed=0' "$WORK/boot-restore.log"
in_ct /opt/quiver/venv/bin/python /root/boot_check.py after-restore

log "tls_mode=letsencrypt against pebble: certbot, the deploy hook, renewal"
in_ct /opt/quiver/venv/bin/python /root/boot_check.py pebble-start
LE=(-e tls_mode=letsencrypt -e tls_email=ops@example.com
    -e tls_acme_server=https://127.0.0.1:14000/dir -e tls_acme_ca_bundle=/etc/pebble/listener.pem)
playbook boot-le1 site.yml "${LE[@]}"
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=[0-9]+ +unreachable=0 +failed=0' "$WORK/boot-le1.log"
playbook boot-le2 site.yml "${LE[@]}"
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=0 +unreachable=0 +failed=0' "$WORK/boot-le2.log" || {
    grep -E '^changed:' "$WORK/boot-le2.log" >&2
    exit 1
}
in_ct /opt/quiver/venv/bin/python /root/boot_check.py letsencrypt

log "deploy-test-boot passed"
