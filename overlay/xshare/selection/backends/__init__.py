"""The backends that route a layer call, each importable without the others
(:func:`xshare.selection.decide.decide` picks one per call):

reference         torch, plain layers: every policy, every device (``'torch'``).
reference_router  torch, router-spec layers (biased and grouped gates).
global_mode       torch, DeepEP global mode: one set per layer from the group's all-reduced statistics.
c                 the C kernel for CPU tensors (``'c'``).
triton            the fused Triton kernels for CUDA tensors (``'triton'``).
"""
