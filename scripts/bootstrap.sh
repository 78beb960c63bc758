#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv from the repo's own files.
# Idempotent: it reinstalls only when a requirements file, pyproject.toml or this script changed.
#   XSHARE_VENV   where the venv lives (default: <repo>/.venv)
#   XSHARE_PYTHON interpreter used to create it (default: python3.11, else python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${XSHARE_VENV:-$root/.venv}"
py="${XSHARE_PYTHON:-$(command -v python3.11 || command -v python3)}"
cons="$root/requirements/constraints.txt"

stamp_inputs=("$root/pyproject.toml" "$root/requirements/"*.txt "$root/scripts/bootstrap.sh" "$root/scripts/_venv.sh")
for extra in "$root"/scripts/install_*.sh; do [ -e "$extra" ] && stamp_inputs+=("$extra"); done
# What the install scripts copy or apply into site-packages (CPU stand-ins, SGLang patches).
while IFS= read -r f; do stamp_inputs+=("$f"); done < <(find "$root/overlay/cpu_shims" "$root/patches" -type f \
  ! -name '*.pyc' 2>/dev/null | sort)
want="$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$venv/.xshare-stamp" ] && [ "$(cat "$venv/.xshare-stamp")" = "$want" ]; then
  exit 0
fi

echo "[bootstrap] creating $venv with $py" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24"
# torch first, CPU build only (see requirements/constraints.txt).
"${pip[@]}" install -q -c "$cons" "$(grep '^torch==' "$cons")"
"${pip[@]}" install -q -c "$cons" -r "$root/requirements/dev.txt"
"${pip[@]}" install -q -c "$cons" -e "$root[eval,dev]"
# Optional stacks (SGLang CPU test bed, deployment tools) install themselves here.
for extra in "$root"/scripts/install_*.sh; do
  [ -e "$extra" ] || continue
  echo "[bootstrap] $(basename "$extra")" >&2
  XSHARE_VENV="$venv" bash "$extra"
done
"$venv/bin/python" - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA build of torch was installed ({torch.__version__}); expected the CPU build"
PY
echo "$want" > "$venv/.xshare-stamp"
echo "[bootstrap] ready: $venv" >&2
