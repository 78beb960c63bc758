#!/usr/bin/env bash
# System packages the tests need (Debian): `prometheus` for promtool (the dashboard's PromQL is parsed by
# `promtool check rules`, exporter output by `promtool check metrics`) and for the Prometheus server that
# scrapes a live exporter. .ci/run calls this before `make test`; `make test` users may run it as root.
# Idempotent and quiet: it does nothing when every tool is present, runs `apt-get update` at most once,
# and never starts a service.
set -euo pipefail

need=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then need+=(prometheus); fi
[ "${#need[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ci_system_deps: need root to apt-get install ${need[*]} (tests that need promtool skip outside CI)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_system_deps: apt-get not found; install ${need[*]} by hand" >&2
  exit 1
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d keeps dpkg from starting the prometheus service on machines that have an init system.
rc_file=/usr/sbin/policy-rc.d
created_rc=0
if [ ! -e "$rc_file" ]; then printf '#!/bin/sh\nexit 101\n' > "$rc_file" && chmod +x "$rc_file" && created_rc=1; fi
trap 'if [ "$created_rc" = 1 ]; then rm -f "$rc_file"; fi' EXIT
log="$(mktemp)"
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
command -v promtool >/dev/null 2>&1 || { echo "ci_system_deps: promtool still missing after install" >&2; exit 1; }
echo "ci_system_deps: installed ${need[*]} in $(( $(date +%s) - start )) s" >&2
