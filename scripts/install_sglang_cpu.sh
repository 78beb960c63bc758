#!/usr/bin/env bash
# Installs SGLang 0.5.23 for the CPU test bed into the project's venv, from the repo's own files:
#   1. the CPU build of torch (requirements/constraints.txt; never the CUDA build),
#   2. sglang's runtime dependencies, every version pinned (requirements/sglang-cpu.txt),
#   3. sglang==0.5.23 and torchvision==0.28.0 with --no-deps (their metadata pins CUDA packages),
#   4. the CPU stand-ins from overlay/cpu_shims/ copied into site-packages: a pure-torch
#      `sgl_kernel` module and `xshare_cpu_fixes` (+ .pth) that lets torchvision import beside CPU torch,
#   5. patches/*.patch applied to the installed sglang (patches/README.md),
#   6. a check that the stand-in provides every `sgl_kernel` symbol this sglang imports on the CPU
#      (python -m xshare.sglang.cpu_check; fails naming the missing symbol), and an import smoke test.
# Run by scripts/bootstrap.sh (with XSHARE_VENV set); idempotent: it returns at once when the stamp
# in the venv matches this script, the requirement files and the stand-ins.
# Every pip call holds /tmp/xshare-pip.lock (other installs may run at the same time).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
reqs="$root/requirements/sglang-cpu.txt"
shims="$root/overlay/cpu_shims"
SGLANG_VERSION="0.5.23"
TORCHVISION_VERSION="0.28.0"
stamp="$venv/.xshare-sglang-cpu-stamp"

if [ ! -x "$py" ]; then
  echo "install_sglang_cpu: no venv at $venv (run scripts/bootstrap.sh)" >&2
  exit 1
fi

want="$(cat "${BASH_SOURCE[0]}" "$root/scripts/_venv.sh" "$reqs" "$cons" "$shims"/sgl_kernel/*.py "$shims"/xshare_cpu_fixes.* \
  "$root"/patches/*.patch "$root"/patches/apply.sh | sha256sum | cut -d' ' -f1)"
installed_version() {
  "$py" -c "import importlib.metadata as m; print(m.version('sglang'))" 2>/dev/null || true
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$(installed_version)" = "$SGLANG_VERSION" ]; then
  echo "install_sglang_cpu: sglang $SGLANG_VERSION (CPU) already installed" >&2
  exit 0
fi

start=$(date +%s)
echo "install_sglang_cpu: installing sglang $SGLANG_VERSION for the CPU into $venv" >&2
pip install -q -c "$cons" "$(grep '^torch==' "$cons")"
pip install -q -c "$cons" -r "$reqs"
pip install -q --no-deps "sglang==$SGLANG_VERSION" "torchvision==$TORCHVISION_VERSION"

site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site/sgl_kernel"
cp -r "$shims/sgl_kernel" "$site/sgl_kernel"
find "$site/sgl_kernel" -name '__pycache__' -prune -exec rm -rf {} +
cp "$shims/xshare_cpu_fixes.py" "$shims/xshare_cpu_fixes.pth" "$site/"

# Patches for what the plugin hooks cannot reach (patches/README.md); idempotent.
bash "$root/patches/apply.sh" --python "$py"

# The stand-in must cover every sgl_kernel symbol this sglang imports on the CPU.
PYTHONPATH="$root/overlay${PYTHONPATH:+:$PYTHONPATH}" "$py" -m xshare.sglang.cpu_check
SGLANG_USE_CPU_ENGINE=1 "$py" - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA build of torch is installed ({torch.__version__})"
import sgl_kernel, torchvision.transforms  # noqa: E401,F401
import sglang.srt.layers.moe.topk  # noqa: F401
assert getattr(sgl_kernel, "XSHARE_STAND_IN", False), "sgl_kernel is not the xshare CPU stand-in"
PY
echo "$want" > "$stamp"
echo "install_sglang_cpu: done in $(( $(date +%s) - start )) s" >&2
