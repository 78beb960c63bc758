"""Import-time fix that lets PyPI's torchvision 0.28.0 (a CUDA build) import beside a CPU torch.

SGLang imports ``torchvision.transforms`` unconditionally. torchvision's compiled ``_C`` extension
needs libtorch_cuda and does not load beside a CPU torch; its Python part then fails at
``torchvision/_meta_registrations.py`` (``register_fake("torchvision::nms")``) because the operator
schema was never defined. This module installs a ``sys.meta_path`` finder (from
``xshare_cpu_fixes.pth``) that, right before the first ``import torchvision`` and only with a CPU
build of torch, defines the two schemas it needs on a ``torch.library.Library`` kept alive for the
process. ``torchvision.transforms`` then works; torchvision's C ops (nms, roi_align) do not.

It imports nothing heavy at interpreter start: torch is imported only when torchvision is.
Installed by ``scripts/install_sglang_cpu.sh``.
"""

from __future__ import annotations

import importlib.abc
import sys

_LIBRARY = None  # the torch.library.Library holding the schemas (kept alive)
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _define_torchvision_schemas() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    import torch

    if torch.version.cuda is not None:  # a CUDA torch loads torchvision's own _C
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"):
            lib.define(schema)
    _LIBRARY = lib


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            try:
                _define_torchvision_schemas()
            except Exception as exc:  # never break the import itself
                print(f"xshare_cpu_fixes: could not pre-define torchvision schemas: {exc}", file=sys.stderr)
        return None  # the normal finders import the module


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
