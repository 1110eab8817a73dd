"""Activation-aware weight quantization (AWQ) with AutoAWQ's semantics, made fast for small hosts.

Per decoder layer, four scaling groups (as AutoAWQ): input_layernorm -> q/k/v (loss on the attention
output), v -> o (only when the shapes allow, i.e. without GQA), post_attention_layernorm -> gate/up (loss
on the MLP output), up -> down (loss on down's output). For each group a grid of ``n_grid`` ratios r gives
candidate scales ``s = x_mean^r / w_mean^(1-r)`` (normalised by sqrt(max*min)); the one with the lowest
MSE against the fp32 output wins and is folded into the previous op. Then a weight-clip search (shrink
up to ``max_shrink`` over the grid, all linears but q/k) and asymmetric int4 quantization.

Speed: losses of a lone linear (v -> o, up -> down) and of the clip search are computed exactly from
Gram matrices of ``stat_tokens`` sampled inputs, so their cost does not grow with tokens; the attention and
MLP losses use ``search_tokens`` sampled tokens (whole sequences for attention); ``x_mean`` comes from
the calibration statistics.
``search_scale=False`` is LMDeploy's default fast path: one smoothing step with alpha 0.5 on the
activation abs-max, no searches.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmkiln.artifact import save_safetensors_atomic, staged_dir, write_json_atomic, write_manifest
from lmkiln.errors import ArtifactError
from lmkiln.models.checkpoint import Checkpoint
from lmkiln.models.llama import DecoderLayer, RMSNorm
from lmkiln.quant.calibrate import load_act_stats
from lmkiln.quant.kv_stats import KMeanHook, file_key, write_kv_stats
from lmkiln.quant.rtn import QuantSpec, fake_quantize, to_awq_tensors
from lmkiln.quant.walker import LayerWalker, pick_device

log = logging.getLogger(__name__)

AWQ_FORMAT = "awq-gemm"
# Files of a model directory that are not weights: copied into every artifact.
_NON_WEIGHT_SKIP = (".safetensors", ".bin", ".pt", ".gguf", ".index.json")


@dataclass(frozen=True)
class AWQConfig:
    spec: QuantSpec = field(default_factory=QuantSpec)
    search_scale: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    search_tokens: int = 2048  # tokens whose module output is compared (attention, MLP)
    stat_tokens: int = 8192  # tokens whose Gram matrices give the linear losses and the clip search
    fast_alpha: float = 0.5
    seed: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        return d


@dataclass
class _Group:
    prev: nn.Module  # RMSNorm or Linear whose output is divided by the scales
    linears: list[nn.Linear]
    inspect: Callable[[torch.Tensor], torch.Tensor] | None  # None: a lone linear, loss via its Gram
    key: str  # linear name: its captured input feeds the group, its statistics give x_mean


def _weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """AutoAWQ's per-input-channel weight statistic: |w| relative to its group's max, averaged over rows."""
    g = w.abs().reshape(-1, group_size)
    rel = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return rel.reshape(w.shape).mean(0)


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / (s.max() * s.min()).sqrt()


def _candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int):
    for i in range(n_grid):
        r = i / n_grid
        yield r, _normalise((x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4))


@torch.no_grad()
def search_scales(group: _Group, inp: torch.Tensor, x_mean: torch.Tensor, cfg: AWQConfig
                  ) -> tuple[torch.Tensor, float]:
    """Best scales for one group (loss on the inspected module's output) and their ratio."""
    fp_out = group.inspect(inp)
    orig = [lin.weight.data.clone() for lin in group.linears]
    w_mean = _weight_mean(torch.cat(orig), cfg.spec.group_size)
    best_loss, best_s, best_r = math.inf, torch.ones_like(x_mean), 0.0
    for r, s in _candidates(x_mean, w_mean, cfg.n_grid):
        for lin, w in zip(group.linears, orig, strict=True):
            lin.weight.data = fake_quantize(w * s, cfg.spec) / s
        loss = (group.inspect(inp) - fp_out).float().pow(2).mean().item()
        if loss < best_loss:
            best_loss, best_s, best_r = loss, s, r
    for lin, w in zip(group.linears, orig, strict=True):
        lin.weight.data = w
    return best_s, best_r


@torch.no_grad()
def search_scales_gram(lin: nn.Linear, gram: torch.Tensor, x_mean: torch.Tensor, cfg: AWQConfig
                       ) -> tuple[torch.Tensor, float]:
    """:func:`search_scales` for a lone linear, exactly, through ``gram = X^T X / T``.

    ``mean_t,n ((x_t W'^T - x_t W^T)_n)^2 = sum(D H * D) / N`` with ``D = W' - W``: the cost no longer
    grows with the number of tokens.
    """
    w = lin.weight.data
    best_loss, best_s, best_r = math.inf, torch.ones_like(x_mean), 0.0
    for r, s in _candidates(x_mean, _weight_mean(w, cfg.spec.group_size), cfg.n_grid):
        d = fake_quantize(w * s, cfg.spec) / s - w
        loss = ((d @ gram) * d).sum().item() / w.shape[0]
        if loss < best_loss:
            best_loss, best_s, best_r = loss, s, r
    return best_s, best_r


def fast_scales(group: _Group, x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """LMDeploy's default smoothing: ``s = x_max^a / w_max^(1-a)``, normalised."""
    w_max = torch.cat([lin.weight.data for lin in group.linears]).abs().amax(dim=0)
    return _normalise((x_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-4))


@torch.no_grad()
def apply_scales(group: _Group, s: torch.Tensor) -> None:
    """Fold ``s`` in: previous op's output divided, the linears' input columns multiplied."""
    prev = group.prev
    if isinstance(prev, RMSNorm):
        prev.weight.div_(s)
    else:
        prev.weight.div_(s.view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s)
    for lin in group.linears:
        lin.weight.mul_(s.view(1, -1))


def group_grams(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per quantization group ``X_g^T X_g / T``: ``[in // G, G, G]`` from ``x`` of shape [tokens, in]."""
    xg = x.reshape(x.shape[0], -1, group_size).transpose(0, 1)  # [n_groups, T, G]
    return torch.bmm(xg.transpose(1, 2), xg) / x.shape[0]


@torch.no_grad()
def search_clip(w: torch.Tensor, grams: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per (row, group) max |w| minimising the mean squared output error on the calibration tokens.

    ``w``: [out, in]; ``grams``: :func:`group_grams` of the input. The error of a clipped, quantized
    row-group ``d = q - w`` is ``d^T H_g d``: AutoAWQ's mean over tokens, exactly, at a cost that does not
    grow with the number of tokens. Returns ``[out, in // G]``.
    """
    gs = cfg.spec.group_size
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // gs, gs)
    org_max = wg.abs().amax(dim=-1)  # [O, n_groups]
    best_err = torch.full_like(org_max, math.inf)
    best_max = org_max.clone()
    for i in range(int(cfg.max_shrink * cfg.n_grid)):
        mx = (org_max * (1 - i / cfg.n_grid)).unsqueeze(-1)
        cur = torch.maximum(torch.minimum(wg, mx), -mx)
        d = (fake_quantize(cur.reshape(out_f, in_f), cfg.spec).reshape(wg.shape) - wg).transpose(0, 1)
        err = (torch.bmm(d, grams) * d).sum(-1).t()  # [O, n_groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, mx.squeeze(-1), best_max)
    return best_max


def _apply_clip(lin: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = lin.weight.data
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group_size, group_size)
    mx = max_val.unsqueeze(-1)
    lin.weight.data = torch.maximum(torch.minimum(wg, mx), -mx).reshape(out_f, in_f)


def _groups(layer: DecoderLayer, cos: torch.Tensor, sin: torch.Tensor) -> list[_Group]:
    attn, mlp = layer.self_attn, layer.mlp
    groups = [_Group(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                     lambda t: attn(t, cos, sin), "self_attn.q_proj")]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(_Group(attn.v_proj, [attn.o_proj], None, "self_attn.o_proj"))
    groups.append(_Group(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp, "mlp.gate_proj"))
    groups.append(_Group(mlp.up_proj, [mlp.down_proj], None, "mlp.down_proj"))
    return groups


class _TokenSampler:
    """Forward pre-hooks keeping the inputs of chosen token positions (rows of the flattened batch)."""

    def __init__(self, layer: DecoderLayer, positions: torch.Tensor) -> None:
        self.positions = positions  # sorted flat indices into [S * T]
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.offset: dict[str, int] = {}
        self.handles = [lin.register_forward_pre_hook(self._hook(name))
                        for name, lin in layer.named_linears().items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            start = self.offset.get(name, 0)
            p = self.positions
            sel = p[(p >= start) & (p < start + x.shape[0])] - start
            self.rows.setdefault(name, []).append(x[sel.to(x.device)])
            self.offset[name] = start + x.shape[0]
        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {name: torch.cat(r) for name, r in self.rows.items()}


@torch.no_grad()
def quantize_layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   forward: Callable[[DecoderLayer, torch.Tensor], torch.Tensor],
                   stats: dict[str, torch.Tensor], prefix: str, cfg: AWQConfig, gen: torch.Generator
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Scale and clip one layer in place; return the fp layer's output on ``x`` and the chosen ratios.

    One forward over all tokens gives the next layer's input and samples every linear's input at
    ``stat_tokens`` random positions; the MLP loss uses ``search_tokens`` of them, the attention loss
    whole sequences worth ``search_tokens``.
    """
    n_seq, seqlen = x.shape[:2]
    n_tok = n_seq * seqlen
    positions = torch.randperm(n_tok, generator=gen)[: min(cfg.stat_tokens, n_tok)].sort().values
    sampler = _TokenSampler(layer, positions)
    try:
        y = forward(layer, x)
    finally:
        feats = sampler.close()
    loss_rows = torch.randperm(positions.numel(), generator=gen)[: cfg.search_tokens].to(x.device)
    seqs = torch.randperm(n_seq, generator=gen)[: max(1, math.ceil(cfg.search_tokens / seqlen))].sort().values
    attn_inp = layer.input_layernorm(x[seqs.to(x.device)])
    ratios = {}
    for g in _groups(layer, cos, sin):
        if not cfg.search_scale:
            s = fast_scales(g, stats[f"{prefix}.{g.key}.absmax"].to(x.device), cfg.fast_alpha)
            ratios[g.key] = cfg.fast_alpha
        else:
            x_mean = stats[f"{prefix}.{g.key}.absmean"].to(x.device)
            if g.inspect is None:
                gram = feats[g.key].T @ feats[g.key] / feats[g.key].shape[0]
                s, ratios[g.key] = search_scales_gram(g.linears[0], gram, x_mean, cfg)
            elif g.key == "self_attn.q_proj":
                s, ratios[g.key] = search_scales(g, attn_inp, x_mean, cfg)
            else:
                s, ratios[g.key] = search_scales(g, feats[g.key][loss_rows], x_mean, cfg)
        apply_scales(g, s)
        feats[g.key] = feats[g.key] / s  # the group's linears now see x / s
    if cfg.search_scale:
        shared = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                  "mlp.up_proj": "mlp.gate_proj"}
        grams: dict[str, torch.Tensor] = {}
        for name, lin in layer.named_linears().items():
            if name.endswith(("q_proj", "k_proj")):
                continue
            key = shared.get(name, name)
            if key not in grams:
                grams[key] = group_grams(feats[key], cfg.spec.group_size)
            _apply_clip(lin, search_clip(lin.weight.data, grams[key], cfg), cfg.spec.group_size)
    return y, ratios


def _check_shapes(ckpt: Checkpoint, spec: QuantSpec) -> None:
    c = ckpt.config
    for name, k in (("q/k/v/gate/up_proj", c.hidden_size), ("o_proj", c.q_size),
                    ("down_proj", c.intermediate_size)):
        spec.check_in_features(name, k)


def layer_tensors(layer: DecoderLayer, prefix: str, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """AWQ tensors of one (scaled, clipped) layer plus its fp16 norms and biases."""
    out = {f"{prefix}.input_layernorm.weight": layer.input_layernorm.weight.half().cpu(),
           f"{prefix}.post_attention_layernorm.weight": layer.post_attention_layernorm.weight.half().cpu()}
    for name, lin in layer.named_linears().items():
        for k, v in to_awq_tensors(lin.weight.data, spec).items():
            out[f"{prefix}.{name}.{k}"] = v.cpu()
        if lin.bias is not None:
            out[f"{prefix}.{name}.bias"] = lin.bias.data.half().cpu()
    return out


def non_layer_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    out = {n: ckpt.get(n, torch.float16) for n in ("model.embed_tokens.weight", "model.norm.weight")}
    if not ckpt.config.tie_word_embeddings and "lm_head.weight" in ckpt:
        out["lm_head.weight"] = ckpt.get("lm_head.weight", torch.float16)
    return out


def awq_config_json(raw_config: dict, spec: QuantSpec) -> dict:
    cfg = dict(raw_config)
    cfg["torch_dtype"] = "float16"
    cfg.pop("dtype", None)
    cfg["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": spec.bits, "group_size": spec.group_size,
        "zero_point": spec.zero_point, "modules_to_not_convert": None,
    }
    return cfg


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in ("config.json", "manifest.json") and not f.name.endswith(
                _NON_WEIGHT_SKIP):
            shutil.copyfile(f, dst / f.name)


def write_quantized_dir(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], out_dir: Path,
                        spec: QuantSpec, info: dict, kv_stats: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an AutoAWQ-GEMM directory atomically (temp dir, manifest last, rename); with ``kv_stats``, also
    ``kv_stats.safetensors`` (:mod:`lmkiln.quant.kv_stats`; AutoAWQ loaders ignore the extra file)."""
    with staged_dir(out_dir) as tmp:
        save_safetensors_atomic(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        raw = json.loads((ckpt.dir / "config.json").read_text())
        write_json_atomic(tmp / "config.json", awq_config_json(raw, spec))
        copy_tokenizer_files(ckpt.dir, tmp)
        if kv_stats is not None:
            write_kv_stats(tmp, kv_stats, {"calibration": info.get("calibration", {})})
        write_manifest(tmp, "awq", {"format": AWQ_FORMAT, "bits": spec.bits,
                                    "group_size": spec.group_size, "zero_point": spec.zero_point, **info})
    return out_dir


def awq_quantize(model_dir: str | Path, stats_path: str | Path, tokens: torch.Tensor, out_dir: str | Path,
                 cfg: AWQConfig, device: str | None = None, progress: bool = True) -> Path:
    """Quantize ``model_dir`` with AWQ into an AutoAWQ-GEMM directory ``out_dir``."""
    ckpt = Checkpoint(model_dir)
    _check_shapes(ckpt, cfg.spec)
    stats, header = load_act_stats(stats_path)
    model_hash = ckpt.source_hash()
    if header.get("model_hash") != model_hash:
        raise ArtifactError(
            f"{stats_path} was computed for another checkpoint (model hash "
            f"{header.get('model_hash', '?')[:12]}…, this one is {model_hash[:12]}…); "
            f"re-run calibrate for {model_dir}"
        )
    if header.get("seqlen") != tokens.shape[1] or header.get("samples") != tokens.shape[0]:
        raise ArtifactError(f"{stats_path} was computed on other calibration windows; re-run calibrate")
    dev = pick_device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    walker = LayerWalker(ckpt, tokens, dev)
    tensors = non_layer_tensors(ckpt)
    ratios: dict[str, dict[str, float]] = {}
    kv_stats: dict[str, torch.Tensor] = {}
    # the quantized model's hidden states over every calibration window, for the K statistics of the model
    # being served (H100, SmolLM2 kv4: the first third of the windows gave +3.20 % / +2.85 % ppl on the two
    # eval texts, all of them +3.25 % / +2.54 %)
    xq = walker.x
    for step in tqdm(walker, total=ckpt.config.num_layers, desc="awq", disable=not progress):
        prefix = f"model.layers.{step.index}"
        # The next layer's input is the fp layer's output, as in AutoAWQ.
        step.x, ratios[str(step.index)] = quantize_layer(step.layer, step.x, step.cos, step.sin,
                                                         walker.forward, stats, prefix, cfg, gen)
        tensors.update(layer_tensors(step.layer, prefix, cfg.spec))
        xq, kv_stats[file_key(step.index)] = quantized_k_mean(step.layer, xq, step.cos, step.sin,
                                                              walker.forward, cfg.spec)
    info = {"source": {"model_hash": model_hash, "architecture": ckpt.config.architecture},
            "calibration": header, "awq": cfg.to_json(), "scale_ratios": ratios}
    return write_quantized_dir(ckpt, tensors, Path(out_dir), cfg.spec, info, kv_stats)


def quantized_k_mean(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     forward: Callable[[DecoderLayer, torch.Tensor], torch.Tensor], spec: QuantSpec
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``x`` (the quantized model's input to this layer) through the layer with its weights quantized
    as served; returns the output and the mean of K after RoPE (``kv_stats.safetensors``).

    Measured on the quantized model, not the fp one: K's channel means are large next to their spread, so
    the few percent the int4 weights move them matter (SmolLM2 kv4: +3.67 % ppl with fp-model means, +3.30 %
    with these). Leaves ``layer`` quantized (it is not used afterwards)."""
    for lin in layer.named_linears().values():
        lin.weight.data = fake_quantize(lin.weight.data.float(), spec).to(lin.weight.dtype)
    attn = layer.self_attn
    hook = KMeanHook(attn.num_kv_heads, attn.head_dim, cos, sin)
    handle = attn.k_proj.register_forward_hook(hook.hook)
    try:
        y = forward(layer, x)
    finally:
        handle.remove()
    return y, hook.mean()


def rtn_quantize(model_dir: str | Path, out_dir: str | Path, spec: QuantSpec, progress: bool = True) -> Path:
    """Round-to-nearest baseline in the same format (no calibration)."""
    ckpt = Checkpoint(model_dir)
    _check_shapes(ckpt, spec)
    tensors = non_layer_tensors(ckpt)
    for i in tqdm(range(ckpt.config.num_layers), desc="rtn", disable=not progress):
        layer = DecoderLayer.from_checkpoint(ckpt, i, torch.float32)
        tensors.update(layer_tensors(layer, f"model.layers.{i}", spec))
    info = {"source": {"model_hash": ckpt.source_hash(), "architecture": ckpt.config.architecture},
            "method": "rtn"}
    return write_quantized_dir(ckpt, tensors, Path(out_dir), spec, info)
