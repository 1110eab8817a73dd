"""A short, readable Llama-family model (Llama, Mistral, Qwen2) with HF parameter names.

One definition serves calibration, AWQ search, perplexity evaluation and (later) the engine. Parameter
names match HF's (``model.layers.3.self_attn.q_proj.weight``), so checkpoints load without renaming.
The rotary embedding comes from transformers, which knows every rope scaling variant.

Two forward paths share the weights: ``forward(input_ids)`` runs whole sequences from position 0 (calibration,
evaluation), and ``forward_paged`` runs the engine's flattened batch of new tokens against a paged KV cache:
each attention layer hands its q/k/v to an attention *backend* (``lmkiln.engine.attention``) that writes K/V
into the cache and attends over it.

A packed int4 artifact fuses q/k/v and gate/up along N: :meth:`DecoderLayer.fuse` swaps in those fused linears
(any module, e.g. ``lmkiln.layers.Int4Linear``), so a layer runs 2 + 2 GEMMs; both forward paths use them.

On CUDA, ``forward_paged`` runs the small ops through the fused Triton kernels of ``lmkiln.kernels.fused``
(residual add + RMSNorm, in-place rotary, SiLU·mul: one launch each) and carries the residual from layer to
layer, vLLM style; the torch code here is their reference. ``LMKILN_FUSED=0`` turns them off (A/B), ``=1``
forces them (on the CPU that needs ``TRITON_INTERPRET=1``). ``forward`` always runs the torch code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.models.checkpoint import Checkpoint
from lmkiln.models.config import ModelConfig

FUSED_ENV = "LMKILN_FUSED"


def use_fused_ops(device: torch.device) -> bool:
    """Whether ``forward_paged`` uses ``lmkiln.kernels.fused``: on CUDA, unless ``LMKILN_FUSED`` says 0/1."""
    from lmkiln.errors import ModelError

    choice = os.environ.get(FUSED_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise ModelError(
            f"{FUSED_ENV}={choice!r}: use 0 (torch ops), 1 (fused Triton kernels) or leave it unset"
        )
    return choice == "1" or (not choice and device.type == "cuda")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        fused: bool = False,
        consume: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``. ``fused``: Triton.
        ``consume``: ``x`` is a pending float32 split-K accumulator (see :func:`project`), zeroed as read."""
        if fused:
            from lmkiln.kernels import fused as kf

            if residual is None:
                return kf.rmsnorm(x, self.weight, self.eps)
            return kf.add_rmsnorm(x, residual, self.weight, self.eps, consume)
        if consume:
            raise ValueError("RMSNorm: consume=True needs the fused kernels (a pending accumulator)")
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def project(linear: nn.Module, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, bool]:
    """``(linear(x), pending)``. In the fused path an int4 decode GEMV may leave its output pending in the
    layer's float32 split-K accumulator (``Int4Linear.matmul_acc``): the next RMSNorm must then consume it
    (``consume=True`` reads and zeroes it). Used for ``o_proj`` and ``down_proj``, whose consumer is the
    residual add + RMSNorm, and at batch 1 for the fused ``qkv_proj``, whose consumer is the decode attention
    kernel (``backend.takes_pending_qkv``)."""
    if fused and hasattr(linear, "matmul_acc"):
        return linear.matmul_acc(x)
    return linear(x), False


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: [B, H, T, D]; ``cos``/``sin``: [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        self.qkv_proj: nn.Module | None = None  # fused q/k/v, set by DecoderLayer.fuse
        # calibrated mean of K after RoPE [num_kv_heads, head_dim] (kv_stats.safetensors): quantized caches
        self.k_mean: torch.Tensor | None = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_paged(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Any,
        meta: Any,
        backend: Any,
        fused: bool = False,
    ) -> tuple[torch.Tensor, bool]:
        """``x [T, hidden]`` (new tokens of several sequences), ``cos``/``sin`` ``[T, head_dim]``; returns
        ``o_proj``'s output and whether it is pending (:func:`project`)."""
        t = x.shape[0]
        pending = False  # q, k, v pending in the int4 qkv GEMV's float32 accumulator (see `project`)
        if fused and self.qkv_proj is not None and backend.takes_pending_qkv(cache, meta, t):
            qkv, pending = project(self.qkv_proj, x, fused)
            q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.qkv(x)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if fused:  # the backend rotates the (strided) q/k views in place; its kernels take a strided v
            out = backend.forward(q, k, v, cache, meta, self.head_dim**-0.5, rope=(cos, sin), pending=pending)
            return project(self.o_proj, out.reshape(t, -1), fused)
        v = v.contiguous()  # a strided slice when fused
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = backend.forward(q, k, v, cache, meta, self.head_dim**-0.5)
        return self.o_proj(out.reshape(t, -1)), False


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # fused gate/up, set by DecoderLayer.fuse

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return self.down_proj(self.activation(x, fused))

    def forward_paged(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, bool]:
        """``(down_proj output, pending)`` (see :func:`project`)."""
        return project(self.down_proj, self.activation(x, fused), fused)

    def activation(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``silu(gate(x)) * up(x)``, the input of ``down_proj``."""
        if getattr(self.gate_up_proj, "applies_silu", False):  # lmkiln.layers.Int4GateUpSiLU
            return self.gate_up_proj(x)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if fused:
            from lmkiln.kernels.fused import silu_mul

            return silu_mul(gate, up)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    # (parent attribute, linear names) of every quantizable linear, in HF naming.
    LINEARS = (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_paged(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Any,
        meta: Any,
        backend: Any,
        fused: bool = False,
        pending: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """vLLM style: returns ``(mlp output, residual, pending)``; the sum of the first two is the layer's
        output (``residual`` None: ``x`` is the layer's input; else the input is ``x + residual``). Same
        numbers as ``forward``. ``pending``: ``x`` is the previous layer's pending accumulator, and so may the
        returned output be (:func:`project`)."""
        if residual is None:
            x, residual = self.input_layernorm(x, fused=fused), x
        else:
            x, residual = self.input_layernorm(x, residual, fused, pending)
        x, pending = self.self_attn.forward_paged(x, cos, sin, cache, meta, backend, fused)
        x, residual = self.post_attention_layernorm(x, residual, fused, pending)
        x, pending = self.mlp.forward_paged(x, fused)
        return x, residual, pending

    def fuse(
        self, qkv_proj: nn.Module, o_proj: nn.Module, gate_up_proj: nn.Module, down_proj: nn.Module
    ) -> None:
        """Replace the seven linears by fused q/k/v and gate/up (outputs concatenated along N) and o/down."""
        attn, mlp = self.self_attn, self.mlp
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
        attn.qkv_proj, attn.o_proj = qkv_proj, o_proj
        mlp.gate_up_proj, mlp.down_proj = gate_up_proj, down_proj

    def named_linears(self) -> dict[str, nn.Linear]:
        return {f"{p}.{n}": getattr(getattr(self, p), n) for p, names in self.LINEARS for n in names}

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, index: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> DecoderLayer:
        with torch.device("meta"):
            layer = cls(ckpt.config)
        prefix = f"model.layers.{index}."
        state = {}
        for name, p in layer.named_parameters():
            full = prefix + name
            if name.endswith(".weight") and ckpt.is_awq(full[: -len(".weight")]):
                state[name] = ckpt.linear_weight(full[: -len(".weight")], dtype)
            else:
                state[name] = ckpt.get(full, dtype)
            _check_shape(full, state[name], p)
        layer.load_state_dict(state, assign=True)
        return layer.to(device)


def _check_shape(name: str, t: torch.Tensor, p: torch.Tensor) -> None:
    from lmkiln.errors import ModelError

    if tuple(t.shape) != tuple(p.shape):
        raise ModelError(
            f"tensor {name} has shape {tuple(t.shape)} but config.json implies {tuple(p.shape)}: "
            "the checkpoint and its config do not match"
        )


class Rotary(nn.Module):
    """cos/sin tables from transformers' rotary embedding (handles llama3/linear/dynamic/yarn scaling).

    :meth:`build_table` precomputes them for positions ``[0, length)`` (the engine: its session length), and
    :meth:`at` then gathers a step's rows from it: two launches instead of the ~9 small ones of computing
    them (the same values bit for bit: every entry is one product and one cos / sin)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.impl = LlamaRotaryEmbedding(cfg.hf_config)
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [length, head_dim]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = torch.empty(0, dtype=dtype, device=positions.device)
        return self.impl(dummy, positions)

    def build_table(self, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Precompute cos / sin of positions ``[0, length)``; False (no table) where the rope type changes
        its frequencies with the positions it sees (``dynamic``, ``longrope``). :meth:`at` must then never
        get a position >= ``length``."""
        rope_type = str(self.impl.rope_type)
        if "dynamic" in rope_type or rope_type == "longrope":
            self.table = None
            return False
        with torch.no_grad():
            cos, sin = self(torch.arange(length, device=device)[None], dtype)
        self.table = (cos[0].contiguous(), sin[0].contiguous())
        return True

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin ``[T, head_dim]`` at ``positions [T]``: gathered from the table where one was built for
        this dtype and device, else computed."""
        t = self.table
        if t is not None and t[0].dtype == dtype and t[0].device == positions.device:
            return t[0].index_select(0, positions), t[1].index_select(0, positions)
        cos, sin = self(positions.unsqueeze(0), dtype)
        return cos[0], sin[0]


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for a batch of full sequences starting at position 0."""
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def forward_paged(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[Any],
        meta: Any,
        backend: Any,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of a flattened batch of new tokens.

        ``input_ids``/``positions`` ``[T]``; ``kv_caches[i]`` is layer ``i``'s cache and ``meta`` the step's
        attention metadata, both interpreted only by ``backend`` (see ``lmkiln.engine.attention``). Pass
        the rows that need logits to :meth:`compute_logits`.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.at(positions, x.dtype)
        fused = use_fused_ops(x.device)
        residual, pending = None, False
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual, pending = layer.forward_paged(
                x, residual, cos, sin, cache, meta, backend, fused, pending
            )
        if residual is None:
            return self.model.norm(x, fused=fused)
        return self.model.norm(x, residual, fused, pending)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def fuse_gate_up_silu(self) -> int:
        """Swap each int4 fused gate/up for an :class:`~lmkiln.layers.Int4GateUpSiLU`, whose GEMM writes the
        SiLU·mul activation itself (one launch less per layer); returns how many layers changed. Layers
        without an int4 gate/up, or whose 2 x I is not a multiple of 64, keep the separate SiLU kernel.
        Idempotent. The engine calls it where it runs the fused kernels."""
        from lmkiln.layers import Int4GateUpSiLU, Int4Linear
        from lmkiln.quant.pack import GATE_UP_BLOCK

        changed = 0
        for layer in self.model.layers:
            lin = layer.mlp.gate_up_proj
            if type(lin) is Int4Linear and lin.out_features % (2 * GATE_UP_BLOCK) == 0:
                layer.mlp.gate_up_proj = Int4GateUpSiLU.from_gate_up(lin)
                changed += 1
        return changed

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> CausalLM:
        cfg = ckpt.config
        with torch.device("meta"):
            model = cls(cfg)
        layers = [DecoderLayer.from_checkpoint(ckpt, i, dtype, device) for i in range(cfg.num_layers)]
        model.model.layers = nn.ModuleList(layers)
        embed = ckpt.get("model.embed_tokens.weight", dtype)
        _check_shape("model.embed_tokens.weight", embed, model.model.embed_tokens.weight)
        model.model.embed_tokens.load_state_dict({"weight": embed}, assign=True)
        model.model.norm.load_state_dict({"weight": ckpt.get("model.norm.weight", dtype)}, assign=True)
        head = embed if cfg.tie_word_embeddings or "lm_head.weight" not in ckpt else ckpt.get(
            "lm_head.weight", dtype)
        model.lm_head.load_state_dict({"weight": head}, assign=True)
        model.rotary = Rotary(cfg)
        return model.to(device).eval()
