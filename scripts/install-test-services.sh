#!/usr/bin/env bash
# Install the Debian packages that the test suite's real servers need, only if they are missing.
#
#   scripts/install-test-services.sh
#
# Today that is OpenStack Swift with its s3api middleware plus memcached: tests/s3 starts a real
# S3-compatible server on loopback with rectflow.testing.swift.SwiftS3Server. Idempotent: when
# every package is already installed it does nothing (no apt-get update). Runs as root (or through
# sudo when it is available) with no stdin.
set -euo pipefail

PACKAGES=(swift swift-proxy swift-account swift-container swift-object memcached)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-test-services: already installed: ${PACKAGES[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-services: apt-get not found; install these Debian packages by hand: ${missing[*]}" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
  else
    echo "install-test-services: need root (or passwordless sudo) to install: ${missing[*]}" >&2
    exit 1
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
install() {
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null
}
if [ "$needs_update" -eq 1 ]; then
  "${SUDO[@]}" apt-get update -q </dev/null
  install
elif ! install; then
  # Stale package lists (a version no longer on the mirror): refresh once and try again.
  "${SUDO[@]}" apt-get update -q </dev/null
  install
fi

echo "install-test-services: done"
