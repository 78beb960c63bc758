"""Router families (pure torch, no SGLang import).

spec      :class:`~xshare.selection.routers.spec.RouterSpec`: one MoE layer's router (scoring, bias,
          expert groups, routed scaling, shared slot, recognised custom functions) as typed values.
gate      SGLang's own torch routing for a spec, optionally restricted to a set of experts
          (:func:`~xshare.selection.routers.gate.reference_route`), and the gate's per-expert scores
          (:func:`~xshare.selection.routers.gate.router_scores`).
numerics  the compiled gates' float32 reductions, sigmoid and softmax, reproduced bit for bit.
"""
