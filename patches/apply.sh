#!/usr/bin/env bash
# Applies patches/*.patch to an installed sglang, idempotently: a patch already applied is skipped,
# one that applies neither way fails (naming it). See patches/README.md.
#   patches/apply.sh [--check] [--site DIR] [--python PY]
#     --check    report only (exit 1 if a patch would not apply)
#     --site     directory that holds the sglang package (default: where PY imports it from)
#     --python   interpreter used to locate sglang (default: .venv/bin/python, else python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
check=0
site=""
py="$root/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1 ;;
    --site) site="$2"; shift ;;
    --python) py="$2"; shift ;;
    *) echo "patches/apply.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$site" ]; then
  site="$("$py" -c 'import importlib.util, os; s = importlib.util.find_spec("sglang"); print(os.path.dirname(list(s.submodule_search_locations)[0]))')"
fi
[ -d "$site/sglang" ] || { echo "patches/apply.sh: no sglang package under $site" >&2; exit 1; }
status=0
for p in "$here"/*.patch; do
  name="$(basename "$p")"
  if patch -d "$site" -p1 -F0 -R --dry-run -s -f < "$p" > /dev/null 2>&1; then
    echo "patches: $name already applied"
  elif patch -d "$site" -p1 -F0 --dry-run -s -f < "$p" > /dev/null 2>&1; then
    if [ "$check" = 1 ]; then
      echo "patches: $name would apply"
    else
      patch -d "$site" -p1 -F0 -s -f --no-backup-if-mismatch < "$p"
      echo "patches: $name applied"
    fi
  else
    echo "patches: $name does NOT apply to the sglang under $site (another sglang version?)" >&2
    status=1
  fi
done
exit $status
