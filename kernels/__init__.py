"""lmkiln.kernels: Triton W4A16 kernels over the packed int4 layout (package directory ``kernels/``).

Public API (the Triton module ``w4a16`` is imported lazily, so the CPU reference works without Triton)::

    w4a16_matmul(x, qweight, sz, zeros=None, scratch=None, config=None) -> Tensor   # any M, fp16/bf16
    torch.ops.lmkiln.w4a16_mm(x, qweight, sz, zeros, scratch)                     # custom op (+ fake impl)
    choose_config(m, n, k, group_size, dtype, device) / heuristic_config(...)      # tuned table or heuristic
    dequant_ref(qweight, sz, dtype) / w4a16_matmul_ref(x, qweight, sz, bias=None)  # pure-torch references

Submodules: ``w4a16`` (kernels, launchers ``gemv``/``fma``/``mma``/``mma_t``/``dequant_mm``/``dequant``,
``KernelConfig``, ``make_scratch``), ``dispatch``, ``reference``; tuned configurations live in
``kernels/tuned/<gpu>.json``. The engine's other kernels, each with a pure-torch reference: ``kv_cache``
(``write_kv``: paged KV write, int8/int4 quantization), ``paged_attention`` (``paged_decode`` split-KV,
``paged_prefill`` varlen with prefix hits; references in ``attention_ref``) and ``fused``
(``add_rmsnorm``/``rmsnorm``, in-place ``rotary_``, ``silu_mul``).
"""

from lmkiln.kernels.dispatch import choose_config, heuristic_config, w4a16_matmul, w4a16_mm
from lmkiln.kernels.reference import check_w4a16_inputs, dequant_ref, w4a16_matmul_ref

__all__ = [
    "check_w4a16_inputs",
    "choose_config",
    "dequant_ref",
    "heuristic_config",
    "w4a16_matmul",
    "w4a16_matmul_ref",
    "w4a16_mm",
]
