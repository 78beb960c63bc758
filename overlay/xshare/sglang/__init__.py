"""The SGLang plugin of XShare: the only package in this project that imports ``sglang``.

SGLang (pinned to 0.5.23) discovers it through the entry point ``xshare`` in the group
``sglang.srt.plugins`` (see pyproject.toml) and calls :func:`xshare.sglang.plugin.register` in
every process it starts. The plugin is off unless ``XSHARE_ENABLE=1`` (or ``"enable": true`` in
the JSON file named by ``XSHARE_CONFIG``); see :mod:`xshare.sglang.settings` and docs/sglang.md.

Modules (sglang is imported lazily, inside functions, so importing these never pulls it in):
  plugin       register(): settings, hooks, admin routes, refusal on bad settings
  settings     environment / config file -> PluginSettings, from the one settings schema
  hooks        the SGLang hook functions and the names of SGLang's forward-level objects
  topk_call    the names of a layer's top-k call and TopKConfig -> the core's LayerCall
  routing      one layer call's routing decision (through xshare.selection.engine) and bookkeeping
  runtime      the per-process holder: active settings, knobs, stats, per-forward state
  placement    expert placements (SGLang's expert-location metadata, or stand-ins), cached
  model_shape  top_k and the expert count of the served model's config
  faults       fault injection for tests
  stats        in-process counters and the per-call metrics window
  metrics      the Prometheus exporter (xshare:* on SGLang's /metrics)
  admin        the admin endpoint (HTTP side, scheduler side, request model)
  trace        bounded router-logits trace recorder (the ../shared/traces format)
  server       start / stop a real SGLang server with the plugin (tests, benchmarks, demo)
  cpu_check    which sgl_kernel symbols the installed sglang needs on the CPU
"""

SGLANG_VERSION = "0.5.23"
PLUGIN_NAME = "xshare"
ENTRY_POINT_GROUP = "sglang.srt.plugins"
