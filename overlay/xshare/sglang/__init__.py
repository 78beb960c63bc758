"""The SGLang plugin of XShare: the only package in this project that imports ``sglang``.

SGLang (pinned to 0.5.23) discovers it through the entry point ``xshare`` in the group
``sglang.srt.plugins`` (see pyproject.toml) and calls :func:`xshare.sglang.plugin.register` in
every process it starts. The plugin is off unless ``XSHARE_ENABLE=1`` (or ``"enable": true`` in
the JSON file named by ``XSHARE_CONFIG``); see :mod:`xshare.sglang.settings` and docs/sglang.md.

Modules (sglang is imported lazily, inside functions, so importing these never pulls it in):
  settings    environment / config file -> PluginSettings (errors name the setting)
  stats       in-process counters (calls, fallbacks by reason, activated experts per layer)
  runtime     the per-process holder: active settings, knobs, stats, per-forward state
  hooks       the SGLang hook functions (routing, forward state, DeepEP zero-token join)
  global_stats  DeepEP 'global' mode: all-reduced batch statistics (pure torch.distributed)
  trace       bounded router-logits trace recorder (the ../shared/traces format)
  cpu_check   which sgl_kernel symbols the installed sglang needs on the CPU
  patches     apply patches/ to an installed sglang
"""

SGLANG_VERSION = "0.5.23"
PLUGIN_NAME = "xshare"
ENTRY_POINT_GROUP = "sglang.srt.plugins"
