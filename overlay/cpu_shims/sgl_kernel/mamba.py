"""``sgl_kernel.mamba`` placeholders: SGLang's linear-attention (GDN/KDA, e.g. Qwen3-Next) backends
import these on the CPU; the stand-in does not implement them (those backends also need
``torch.ops.sgl_kernel`` operators), so calling one raises ``NotImplementedError``."""

from sgl_kernel import _unsupported

causal_conv1d_fn_cpu = _unsupported("mamba.causal_conv1d_fn_cpu", "linear attention (mamba/GDN)")
causal_conv1d_update_cpu = _unsupported("mamba.causal_conv1d_update_cpu", "linear attention (mamba/GDN)")
chunk_gated_delta_rule_cpu = _unsupported("mamba.chunk_gated_delta_rule_cpu", "linear attention (mamba/GDN)")
