"""XShare for SGLang: batch-aware expert selection for Mixture-of-Experts serving.

Sub-packages:
  xshare.selection  pure tensor policies (depends on torch only)
  xshare.eval       trace replay, EP simulation, cost model, plots
  xshare.sglang     the SGLang plugin (the only code that imports sglang)
"""

__version__ = "0.1.0"
