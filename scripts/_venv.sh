# Sourced by the install scripts (never run alone): the repository, the project's venv, the pinned
# constraints, and pip under /tmp/xshare-pip.lock (other installs may run at the same time).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${XSHARE_VENV:-$root/.venv}"
py="$venv/bin/python"
cons="$root/requirements/constraints.txt"
pip() { flock /tmp/xshare-pip.lock "$py" -m pip --disable-pip-version-check "$@"; }
