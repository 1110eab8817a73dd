"""Batch-1 decode of an int4 Llama-family model through the persistent layer kernel
(``kernels/persistent.py``).

A step is then ``2 + 2 x layers`` launches instead of ~7 a layer: the first layer's norm + qkv, and per layer
the decode attention (the backend's kernel: rotary, KV write, attention, as in the unfused path) followed by
one persistent launch for ``o -> norm -> gate/up -> down -> norm -> next qkv`` (the last layer's ends with the
model's final norm). :meth:`CausalLM.forward_paged` takes this path for a one-token step where
:func:`PersistentDecode.build` accepts the model; ``LMKILN_PERSISTENT=0`` turns it off (A/B).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from lmkiln.errors import ModelError

log = logging.getLogger(__name__)

PERSISTENT_ENV = "LMKILN_PERSISTENT"
GRID_ENV = "LMKILN_PERSISTENT_GRID"  # A/B: "CTAS_PER_SM,NUM_WARPS,PREFETCH,CHUNKS" (see grid_setting)
DEFAULT_GRID = (4, 2, True, 2)


def persistent_enabled() -> bool:
    choice = os.environ.get(PERSISTENT_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise ModelError(
            f"{PERSISTENT_ENV}={choice!r}: use 0 (off), 1 (on where the model allows) or leave it unset"
        )
    return choice != "0"


def grid_setting() -> tuple[int, int, bool, int]:
    """``(ctas_per_sm, num_warps, prefetch, chunks_per_iteration)`` of the persistent kernel:
    ``LMKILN_PERSISTENT_GRID`` (e.g. ``4,2,1,2``), else :data:`DEFAULT_GRID`."""
    raw = os.environ.get(GRID_ENV, "").strip()
    if not raw:
        return DEFAULT_GRID
    try:
        ctas, warps, pf, cpi = (int(v) for v in raw.split(","))
    except ValueError:
        ctas = warps = pf = cpi = -1
    if ctas < 1 or warps not in (1, 2, 4, 8) or pf not in (0, 1) or cpi not in (1, 2, 4, 8):
        raise ModelError(
            f"{GRID_ENV}={raw!r}: give CTAS_PER_SM,NUM_WARPS,PREFETCH,CHUNKS, e.g. 4,2,1,2 (warps and chunks "
            "1, 2, 4 or 8, prefetch 0 or 1)"
        )
    return ctas, warps, bool(pf), cpi


def _weights(lin: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lin.qweight, lin.sz, lin.zeros


class PersistentDecode:
    """Buffers and launch plan for one model on one device (built once, reused by every batch-1 step and by
    the CUDA graph captured for it)."""

    def __init__(self, model: Any, kernel: Any) -> None:
        cfg = model.config
        dev = model.lm_head.weight.device
        h, i = cfg.hidden_size, cfg.intermediate_size
        n = cfg.num_layers
        self.model, self.kernel = model, kernel
        # zeroed at the start of every step: o / down accumulators of every layer, 3 barrier counters a layer
        self.arena = torch.zeros(n * 2 * h + n * 4, dtype=torch.float32, device=dev)
        self.o_acc = self.arena[: n * h].view(n, h)
        self.dn_acc = self.arena[n * h : 2 * n * h].view(n, h)
        self.bars = self.arena[2 * n * h :].view(torch.int32).view(n, 4)
        f16 = torch.float16
        self.act = torch.empty(i, dtype=f16, device=dev)
        self.hmid = torch.empty(h, dtype=f16, device=dev)
        self.res = torch.empty(2, h, dtype=f16, device=dev)
        self.out = torch.empty(1, h, dtype=f16, device=dev)
        for layer in model.model.layers:  # the qkv accumulators the attention kernel consumes
            layer.self_attn.qkv_proj.ensure_acc()

    @classmethod
    def build(cls, model: Any) -> PersistentDecode | None:
        """The plan for ``model``, or None where it does not apply: not CUDA fp16, or a layer whose linears
        are not plain packed int4 (fused qkv / o / SiLU gate-up / down, no bias, unpadded K, one group size),
        or a tensor-parallel model. Logs why."""
        from lmkiln.kernels.persistent import LayerKernel, LayerShape
        from lmkiln.layers import Int4GateUpSiLU, Int4Linear

        dev = model.lm_head.weight.device
        if dev.type != "cuda" or model.lm_head.weight.dtype != torch.float16:
            return None
        groups = set()
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            lins = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            kinds = (Int4Linear, Int4Linear, Int4GateUpSiLU, Int4Linear)
            if any(type(lin) is not kind for lin, kind in zip(lins, kinds, strict=True)):
                log.info("persistent decode: off (a layer's linears are not the fused int4 ones)")
                return None
            if any(lin.bias is not None or lin.packed_k != lin.in_features for lin in lins):
                log.info("persistent decode: off (a linear has a bias or a padded K)")
                return None
            groups |= {lin.group_size for lin in lins}
        cfg = model.config
        if len(groups) != 1:
            log.info("persistent decode: off (group sizes %s)", sorted(groups))
            return None
        shape = LayerShape(cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size, groups.pop())
        try:
            ctas, warps, pf, cpi = grid_setting()
            kernel = LayerKernel(shape, dev, ctas_per_sm=ctas, num_warps=warps, prefetch=pf, cpi=cpi)
        except Exception as e:  # shapes the kernel does not take: the unfused path runs them
            log.info("persistent decode: off (%s)", e)
            return None
        log.info("persistent decode: on (%s)", kernel.describe())
        return cls(model, kernel)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: Any, meta: Any, backend: Any
    ) -> torch.Tensor:
        """Final hidden states ``[1, hidden]`` (after the model's norm) of one token; ``x`` its embedding."""
        model = self.model
        layers = model.model.layers
        eps = layers[0].input_layernorm.eps
        self.arena.zero_()
        k = self.kernel
        emb = x.reshape(-1)
        first = layers[0]
        none = dict(
            attn=None,
            o=None,
            res=None,
            gu=None,
            post_w=emb,
            act=self.act,
            hmid=self.hmid,
            dn=None,
            res_out=None,
            out=None,
        )
        k.launch(
            first=3,
            last=3,
            final=False,
            head=True,
            hin=emb,
            qkv=_weights(first.self_attn.qkv_proj),
            in_w=first.input_layernorm.weight,
            q_acc=first.self_attn.qkv_proj.acc[0],
            o_acc=self.o_acc[0],
            dn_acc=self.dn_acc[0],
            bars=self.bars[0],
            eps=eps,
            **none,
        )
        res = emb
        n = len(layers)
        for li, (layer, cache) in enumerate(zip(layers, kv_caches, strict=True)):
            attn = layer.self_attn
            if not backend.takes_pending_qkv(cache, meta, 1):
                raise ModelError(
                    "persistent decode: the attention backend cannot take a pending qkv (engine bug)"
                )
            q, kk, v = attn.qkv_proj.acc[:1].split(attn.qkv_sizes, dim=-1)
            q = q.reshape(1, attn.num_heads, attn.head_dim)
            kk = kk.reshape(1, attn.num_kv_heads, attn.head_dim)
            v = v.reshape(1, attn.num_kv_heads, attn.head_dim)
            out = backend.forward(q, kk, v, cache, meta, attn.head_dim**-0.5, rope=(cos, sin), pending=True)
            last = li == n - 1
            nxt = None if last else layers[li + 1]
            res_out = self.res[(li + 1) % 2]
            k.launch(
                first=0,
                last=3,
                final=last,
                head=False,
                attn=out.reshape(-1),
                o=_weights(attn.o_proj),
                res=res,
                gu=_weights(layer.mlp.gate_up_proj),
                post_w=layer.post_attention_layernorm.weight,
                act=self.act,
                hmid=self.hmid,
                dn=_weights(layer.mlp.down_proj),
                hin=self.hmid,
                qkv=None if last else _weights(nxt.self_attn.qkv_proj),
                in_w=model.model.norm.weight if last else nxt.input_layernorm.weight,
                q_acc=None if last else nxt.self_attn.qkv_proj.acc[0],
                res_out=res_out,
                out=self.out,
                o_acc=self.o_acc[li],
                dn_acc=self.dn_acc[li],
                bars=self.bars[li],
                eps=eps,
            )
            res = res_out
        return self.out
