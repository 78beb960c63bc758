"""The SGLang plugin of XShare: the only package in this project that imports ``sglang``.

SGLang (pinned to 0.5.23) discovers it through the entry point ``xshare`` in the group
``sglang.srt.plugins`` (see pyproject.toml) and calls :func:`xshare.sglang.plugin.register` in
every process it starts. The plugin is off unless ``XSHARE_ENABLE=1`` (or ``"enable": true`` in
the JSON file named by ``XSHARE_CONFIG``); see :mod:`xshare.sglang.settings` and docs/sglang.md.

Modules, from the top (imports only point down; sglang is imported lazily, inside functions, so
importing these never pulls it in):
  plugin          register(): settings, the table of a scheduler's hooks, the HTTP process's request
                  check and admin routes
  hooks/          the functions SGLang calls: routing (one layer call), forward (the forward state),
                  model (load, EPLB), requests (exact-routing flags), binding (arguments by name)
  admin/          the admin endpoint (HTTP side, scheduler side, config messages)
  layer           one layer call: SGLang's arguments -> the core's LayerCall -> decide() -> SGLang's
                  replacement arguments
  observe/        counters and the metrics window (stats, tally, figures, record), process reports
                  (report), the Prometheus exporter (metrics), the routing trace, the coverage survey
  state           ProcessState and ForwardState: settings, device knobs and buffers, process facts
  topk_call       the names of a layer's top-k call and TopKConfig -> the core's LayerCall
  verify_layout   speculative verify rows -> requests
  settings        environment / config file -> PluginSettings, from the one settings schema
  placement       expert placements (SGLang's expert-location metadata, or stand-ins), cached
  replicas        predictive replica plans for SGLang's EPLB
  model_shape     top_k and the expert count of the served model's config
  faults          fault injection for tests
  server          start / stop a real SGLang server with the plugin (tests, benchmarks, demo)
  cpu_check       which sgl_kernel symbols the installed sglang needs on the CPU
  one_batch       SGLang's one-batch benchmark with the plugin loaded
"""

SGLANG_VERSION = "0.5.23"
PLUGIN_NAME = "xshare"
ENTRY_POINT_GROUP = "sglang.srt.plugins"
