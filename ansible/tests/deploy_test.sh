#!/usr/bin/env bash
# make deploy-test: apply ansible/site.yml to a real Debian bookworm root file system
# through the community.general.chroot connection, twice (the second run must change
# nothing), then check the result and run Quiver from the installed venv inside the root
# (ansible/tests/deploy_check.py): TLS with the deployed certificate, the fail2ban filter
# on its real log lines, a backup through the TLS control plane, and restore.yml.
#
# Needs root, debootstrap (installed with apt-get if missing) and the network to the
# Debian mirror and PyPI. The bare root is cached as a tarball in var/deploy-test/;
# every run starts from a fresh copy of it.
#
# Facts this relies on: services do not start in a chroot, and `ufw enable` there would
# load rules into the kernel of the machine running the test -- the inventory sets
# quiver_start_services=false, so nothing is started and UFW is configured, not enabled.
# A policy-rc.d forbids package scripts from starting daemons (nginx would otherwise bind
# port 80 of this machine).
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$(pwd)
WORK=${DEPLOY_TEST_DIR:-$REPO/var/deploy-test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=$WORK/bookworm-minbase.tar.gz
ROOT=$WORK/rootfs
TOOLS=$REPO/.venv-ansible/bin
started=$(date +%s)

log() { printf '\n=== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }

cleanup_mounts() {
    for m in "$ROOT/proc" "$ROOT/dev/pts" "$ROOT/dev"; do
        if mountpoint -q "$m" 2>/dev/null; then umount -l "$m"; fi
    done
}
trap cleanup_mounts EXIT

if [ "$(id -u)" != 0 ]; then
    echo "deploy-test needs root (chroot, debootstrap)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi
mkdir -p "$WORK"

if [ ! -s "$CACHE" ]; then
    log "debootstrap bookworm (cached afterwards in $CACHE)"
    rm -rf "$WORK/bootstrap"
    debootstrap --variant=minbase \
        --include=python3,python3-apt,systemd,systemd-sysv,dbus,ca-certificates \
        bookworm "$WORK/bootstrap" "$MIRROR"
    tar -C "$WORK/bootstrap" -czf "$CACHE.tmp" .
    mv "$CACHE.tmp" "$CACHE"
    rm -rf "$WORK/bootstrap"
fi

log "fresh root from $CACHE"
cleanup_mounts
rm -rf "$ROOT"
mkdir -p "$ROOT"
tar -C "$ROOT" -xzf "$CACHE"
# Trust what this machine trusts (a registry proxy's CA), resolve names like it does,
# and never let a package start a daemon.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$ROOT/usr/local/share/ca-certificates"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/usr/local/share/ca-certificates/deploy-test-host.crt"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" > "$ROOT/etc/apt/sources.list"

cat > "$REPO/ansible/tests/inventory/hosts.yml" <<EOF
---
# Written by deploy_test.sh: the chroot connection's host is the root's path.
quiver:
  hosts:
    deploy-test:
      ansible_host: $ROOT
EOF

unset PIP_FIND_LINKS
export PATH="$TOOLS:$PATH"
export ANSIBLE_HOME="$REPO/ansible/.ansible"
export ANSIBLE_FORCE_COLOR=0
run_site() {
    (cd "$REPO/ansible" && ansible-playbook -i tests/inventory \
        --vault-password-file tests/vault-password.txt site.yml) 2>&1 | tee "$WORK/$1.log"
}

log "site.yml, first run"
run_site run1
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=[0-9]+ +unreachable=0 +failed=0' "$WORK/run1.log"

log "site.yml, second run: must change nothing"
run_site run2
if ! grep -Eq 'deploy-test +: ok=[0-9]+ +changed=0 +unreachable=0 +failed=0' "$WORK/run2.log"; then
    echo "deploy-test: the second run changed something (see $WORK/run2.log):" >&2
    grep -E '^changed:' "$WORK/run2.log" >&2 || true
    exit 1
fi

log "checking the root, running Quiver in it, backup and restore.yml"
"$REPO/.venv/bin/python" "$REPO/ansible/tests/deploy_check.py" "$ROOT"

# Upgrade then rollback: a second wheel built from this commit with one more migration
# (a table in the system schema) and a local version, so its content -- and its release
# directory -- differ and the schema moves. site.yml must snapshot before switching;
# the new release migrates when it starts; rollback.yml switches back and restores.
log "building the upgrade wheel (this commit + one migration)"
rm -rf "$WORK/upgrade-src" "$WORK/upgrade-dist"
mkdir -p "$WORK/upgrade-src"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/upgrade-src"
printf 'CREATE TABLE _quiver.deploy_test_upgrade (note VARCHAR);\n' \
    > "$WORK/upgrade-src/catalog/migrations/0999_deploy_test_upgrade.sql"
sed -i 's/^version = "\(.*\)"$/version = "\1+upgrade"/' "$WORK/upgrade-src/pyproject.toml"
(cd "$WORK/upgrade-src" && SOURCE_DATE_EPOCH=315532800 "$REPO/.venv/bin/python" -m pip wheel \
    --quiet --no-deps --wheel-dir "$WORK/upgrade-dist" .)
UPGRADE_WHEEL=$(ls "$WORK"/upgrade-dist/quiver-*.whl)

log "site.yml with the upgrade wheel"
(cd "$REPO/ansible" && ansible-playbook -i tests/inventory --vault-password-file tests/vault-password.txt \
    -e quiver_wheel="$UPGRADE_WHEEL" site.yml) 2>&1 | tee "$WORK/upgrade.log"
grep -Eq 'deploy-test +: ok=[0-9]+ +changed=[0-9]+ +unreachable=0 +failed=0' "$WORK/upgrade.log"

log "checking the upgrade, starting it, rollback.yml"
"$REPO/.venv/bin/python" "$REPO/ansible/tests/deploy_check.py" "$ROOT" --upgrade-rollback

# The monitoring rules the operator installs beside Prometheus (ansible/monitoring/): checked
# and unit-tested with promtool (Debian's prometheus package; .ci/run installs it as root).
if command -v promtool >/dev/null; then
    log "checking the monitoring rules with promtool"
    (cd "$REPO/ansible/monitoring" && promtool check rules alerts.yml && promtool test rules alerts_test.yml)
else
    echo "promtool is not installed (apt-get install prometheus): monitoring rules not checked" >&2
    exit 1
fi

log "deploy-test passed"
