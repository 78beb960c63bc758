"""The tiny MoE models: built offline (no model hub), one builder for all.

* :mod:`~xshare.models.architecture`: the one builder (:func:`build_moe`: Hugging Face config and
  weight initialisation) of every tiny model here.
* The trained models: :mod:`~xshare.models.config` (:class:`TinyConfig`, shape and recipe of the Qwen3-MoE model;
  :class:`AuxFreeConfig`, the GLM-4.5-architecture model with DeepSeek-V3's router trained without an
  auxiliary loss, ``xshare train-tiny --router deepseek_v3``),
  :mod:`~xshare.models.tokenizer` (character-level tokenizer, training batches),
  :mod:`~xshare.models.tasks` (the synthetic tasks), :mod:`~xshare.models.training`,
  :mod:`~xshare.models.experts` (the sorted per-expert forward used for training),
  :mod:`~xshare.models.store` (save, load, hashes, manifest), :mod:`~xshare.models.cache`
  (:func:`ensure_model`: train once, then load from the cache; ``--check``).
* Offline evaluation: :mod:`~xshare.models.routing_override` (batch-aware selection in place of the
  router), :mod:`~xshare.models.decode` (greedy decoding, KV cache), :mod:`~xshare.models.evaluation`
  (exact match, activated experts, task specialisation), :mod:`~xshare.models.profiling` (MoE share
  of a decode step).
* The untrained serving-test models: :mod:`~xshare.models.tiny_moe` (``xshare tiny-model``; presets
  ``qwen3_moe``, ``glm45``, ``deepseek_v3_router`` on the GLM-4.5 architecture, ``mixtral``).

Typical use::

    from xshare.models import cache, evaluation, store, tasks
    model_dir = cache.ensure_model()                    # build (train) once, then load from the cache
    model, tok = store.load(model_dir)
    res = evaluation.evaluate(model, tok, tasks.heldout(500), selector=SelectorConfig("xshare", budget=16))

The trained models are a ``Qwen3MoeForCausalLM`` and a ``Glm4MoeForCausalLM`` in Hugging Face format
(safetensors, per-expert weights as SGLang loads them) with their own character-level tokenizer, so an
SGLang server loads each from its directory alone. See docs/model.md.
"""
