"""Engine settings (one home for their defaults; the CLI maps its flags onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmkiln.engine.errors import EngineConfigError

QUANT_POLICIES = (0, 4, 8)


@dataclass
class EngineConfig:
    """Settings of one :class:`~lmkiln.engine.llm_engine.LLMEngine`.

    ``cache_max_entry_count``: a float in (0, 1] is the fraction of the memory left free after the weights
    are loaded that the KV cache takes (as LMDeploy: on a GPU, of the free GPU memory; on the CPU, of
    ``cpu_cache_bytes``, capped by the host's available memory); an int is a block count. ``session_len``
    (default: the model's ``max_position_embeddings``) is the longest a sequence (prompt + output, all turns
    of a session) may grow; a longer prompt is refused. ``max_num_batched_tokens`` is the token budget of
    one step (decode tokens count one each); ``max_prefill_token_num`` caps the prompt tokens of one step,
    so a longer prompt is split into chunks and fused with the decodes of other requests.
    ``kv_sink_entries``: exact (model dtype) copies of position 0's K/V kept beside a quantized cache, one per
    distinct first token of the live and recent sequences (see :mod:`lmkiln.engine.kv_sink`); 0 disables them,
    an fp cache (``quant_policy`` 0) never uses them.
    """

    model_dir: str | Path
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (config dtype on GPU, float32 on CPU), "float16", "bfloat16", "float32"
    block_size: int = 64
    cache_max_entry_count: float | int = 0.8
    cpu_cache_bytes: int = 1 << 30
    max_num_seqs: int = 256
    max_prefill_token_num: int = 8192
    max_num_batched_tokens: int | None = None  # default: max_prefill_token_num
    session_len: int | None = None
    enable_prefix_caching: bool = False
    quant_policy: int = 0
    kv_sink_entries: int = 64
    eager: bool = False  # True: no CUDA graphs for decode (the oracle); the CPU always runs eagerly
    seed: int = 0
    verify_artifact: bool = True  # check every artifact file against its sha256 in manifest.json on load
    tp: int = 1  # tensor parallel degree: ranks (GPUs of one host) the model is split over
    # schedule and launch step N+1 before step N's sampled tokens reach the host (one rank; see LLMEngine)
    async_scheduling: bool = True
    # on CUDA: prefill dummy prompts at start, so no request waits for a kernel compile (LLMEngine.warm_up)
    warmup: bool = True

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise EngineConfigError(f"block_size must be a power of two, got {self.block_size}")
        c = self.cache_max_entry_count
        if isinstance(c, bool) or not isinstance(c, int | float):
            raise EngineConfigError(f"cache_max_entry_count must be a number, got {c!r}")
        if isinstance(c, int) and c < 1:
            raise EngineConfigError(f"cache_max_entry_count as a block count must be >= 1, got {c}")
        if isinstance(c, float) and not 0 < c <= 1:
            raise EngineConfigError(
                f"cache_max_entry_count as a fraction must be in (0, 1], got {c} "
                "(pass an int for a block count)"
            )
        if self.max_num_seqs < 1:
            raise EngineConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_prefill_token_num < 1:
            raise EngineConfigError(f"max_prefill_token_num must be >= 1, got {self.max_prefill_token_num}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = self.max_prefill_token_num
        if self.max_num_batched_tokens < 1:
            raise EngineConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.quant_policy not in QUANT_POLICIES:
            raise EngineConfigError(
                f"quant_policy must be one of {QUANT_POLICIES} (0: fp KV cache, 8: int8, 4: int4), "
                f"got {self.quant_policy}"
            )
        e = self.kv_sink_entries
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise EngineConfigError(
                f"kv_sink_entries must be an int >= 0 (attention-sink entries of a quantized KV cache; 0 "
                f"turns them off), got {e!r}"
            )
        if self.session_len is not None and self.session_len < 2:
            raise EngineConfigError(f"session_len must be >= 2, got {self.session_len}")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise EngineConfigError(f"dtype must be auto, float16, bfloat16 or float32, got {self.dtype!r}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise EngineConfigError(f"tp (tensor parallel degree) must be an int >= 1, got {self.tp!r}")

    @property
    def sink_entries(self) -> int:
        """Attention-sink entries the engine keeps: ``kv_sink_entries`` for a quantized cache, else 0."""
        return self.kv_sink_entries if self.quant_policy else 0
