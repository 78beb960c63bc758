"""Deployment helpers for XShare on SGLang.

* :mod:`xshare.deploy.launcher` -- multi-node launcher on Ray (``xshare launch``): one placement group with one
  bundle per node, one agent actor per node running ``sglang.launch_server`` (through ``xshare serve``) with
  ``--nnodes/--node-rank/--dist-init-addr``, log streaming, health checks, whole-group restarts, clean shutdown.
  Its parts: :mod:`~xshare.deploy.launch_config` (configuration, command lines), :mod:`~xshare.deploy.node_agent`
  (the per-node actor), :mod:`~xshare.deploy.placement` (placement group, agents), :mod:`~xshare.deploy.group`
  (one start of the group), :mod:`~xshare.deploy.events`, :mod:`~xshare.deploy.supervisor` (restart policy).
* :mod:`xshare.deploy.standin` -- a documented stand-in server with SGLang's multi-node command line; it forms a
  real ``torch.distributed`` gloo group over ``--dist-init-addr`` (used to test the multi-node wiring on a CPU).
* :mod:`xshare.deploy.dashboard` -- builds the Grafana dashboard (the Helm chart's
  ``dashboards/xshare-sglang.json``; the repository's ``dashboards/`` links to it).
* :mod:`xshare.deploy.promql` -- the dashboard's PromQL checks: parse with promtool, list metric names,
  compare with a live scrape; the relabeling that restores ``:`` in scraped names.
* :mod:`xshare.deploy.panel_png` -- one panel drawn from real scraped data (a loopback Prometheus + matplotlib).

Nothing here is imported by the selection core or the SGLang plugin. Ray, grafana-foundation-sdk and
promql-parser are imported lazily by the modules that need them (``scripts/install_deploy_tools.sh``).
"""
