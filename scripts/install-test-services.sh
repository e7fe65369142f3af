#!/usr/bin/env bash
# Install the Debian packages that the test suite's real servers need, only if they are missing.
#
#   scripts/install-test-services.sh [--required | --if-possible]
#
# Today that is OpenStack Swift with its s3api middleware plus memcached: tests/s3 starts a real
# S3-compatible server on loopback with tests.support.swift.SwiftS3Server. Idempotent: when
# every package is already installed it does nothing (no apt-get update). Runs as root (or through
# sudo when it is available without a password) with no stdin.
#
# When it cannot install them (no apt-get, not root and no passwordless sudo, apt-get failing) it
# prints one line naming the packages and the reason, then exits 1 (--required, the default, what
# .ci/run uses) or 0 (--if-possible, what `make test` uses: the tests that need them then skip).
set -euo pipefail

PACKAGES=(swift swift-proxy swift-account swift-container swift-object memcached)

mode=required
case "${1:-}" in
  ""|--required) mode=required ;;
  --if-possible) mode=if-possible ;;
  *) echo "usage: $0 [--required | --if-possible]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-test-services: already installed: ${PACKAGES[*]}"
  exit 0
fi

# One line: which packages, why not, and what happens next.
cannot() {
  if [ "$mode" = if-possible ]; then
    echo "install-test-services: cannot install ${missing[*]}: $1; the tests that need them (tests/s3) will skip" >&2
    exit 0
  fi
  echo "install-test-services: cannot install ${missing[*]}: $1" >&2
  exit 1
}

if ! command -v apt-get >/dev/null 2>&1; then
  cannot "apt-get not found (not Debian or Ubuntu?); install these Debian packages by hand"
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
  else
    cannot "not root and no passwordless sudo; run scripts/install-test-services.sh as root"
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-test-services: installing ${missing[*]}"
# Refresh the package lists only when apt does not know a candidate for a missing package.
needs_update=0
for pkg in "${missing[@]}"; do
  cand=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then needs_update=1; break; fi
done
apt_update() {
  "${SUDO[@]}" apt-get update -q </dev/null
}
apt_install() {
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null
}
failed="apt-get failed (its messages are above)"
if [ "$needs_update" -eq 1 ]; then
  { apt_update && apt_install; } || cannot "$failed"
elif ! apt_install; then
  # Stale package lists (a version no longer on the mirror): refresh once and try again.
  { apt_update && apt_install; } || cannot "$failed"
fi

echo "install-test-services: done"
