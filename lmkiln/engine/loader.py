"""Load a model directory for serving, whatever the artifact: an HF checkpoint, an AWQ dir or a packed dir.

The manifest decides (never a file name): no manifest or kind ``hf_model``: an HF checkpoint (fp16/bf16/fp32
safetensors; an InternLM2 one has its fused ``wqkv`` / ``w1 w3 w2`` converted to the Llama layout on load);
``awq``: AutoAWQ GEMM tensors, dequantized on load; ``packed``: the ``lmkiln-w4-tiled`` layout, refused if it
is another layout version.

A packed dir is served as int4 (``int4="on"``): every decoder layer gets :class:`lmkiln.layers.Int4Linear`
modules over the artifact's fused q/k/v and gate/up and its o/down (2 + 2 int4 GEMMs a layer; the W4A16
Triton kernels on CUDA, the pure-torch reference on the CPU). ``int4="off"`` dequantizes it into the plain
model (exact: ``q * s + m``); ``"auto"`` (the default, or the ``LMKILN_INT4`` environment variable) is int4 on
CUDA and dequantized on the CPU, where the reference matmul would dequantize on every call.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.engine.errors import CacheMemoryError, EngineConfigError
from lmkiln.errors import ArtifactError, ModelError
from lmkiln.models.checkpoint import Checkpoint
from lmkiln.models.config import ModelConfig
from lmkiln.models.internlm2 import internlm2_config, internlm2_to_hf, is_internlm2, read_internlm2_tensors
from lmkiln.models.llama import CausalLM, Rotary

log = logging.getLogger(__name__)

LOADABLE_KINDS = ("hf_model", "awq", "packed")
INT4_MODES = ("auto", "on", "off")
INT4_ENV = "LMKILN_INT4"
GIB = 1 << 30


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    kind: str
    dtype: torch.dtype
    device: torch.device
    weight_bytes: int
    int4: bool = False  # decoder linears are Int4Linear over the packed layout


def artifact_kind(model_dir: str | Path) -> str:
    """``hf_model``, ``awq`` or ``packed`` (from ``manifest.json``; an HF dir without one is ``hf_model``)."""
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if not manifest.is_file():
        if not model_dir.is_dir():
            raise ModelError(
                f"model directory {model_dir} does not exist; pass an HF, AWQ or packed directory"
            )
        return "hf_model"
    try:
        kind = json.loads(manifest.read_text()).get("kind")
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest} is not valid JSON ({e}); rebuild the artifact") from e
    if kind not in LOADABLE_KINDS:
        raise ArtifactError(
            f"{model_dir} is a {kind!r} artifact; the engine serves {', '.join(LOADABLE_KINDS)} directories "
            "(point at resources/models/<name>, results/<name>/awq or results/<name>/packed)"
        )
    return kind


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise EngineConfigError(f"device must be cpu or cuda, got {device!r}")
    return dev


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32  # CPU kernels for half types are slow and less accurate
    hf = cfg.hf_config
    cfg_dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16) else torch.float16


def resolve_int4(int4: str | None, kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a packed dir is served through ``Int4Linear`` (see the module docstring)."""
    mode = int4 if int4 is not None else os.environ.get(INT4_ENV, "auto")
    if mode not in INT4_MODES:
        raise EngineConfigError(f"int4 must be one of {INT4_MODES} (argument or ${INT4_ENV}), got {mode!r}")
    if kind != "packed":
        if mode == "on":
            log.info("int4='on' applies to packed directories only; this is a %s directory", kind)
        return False
    use = mode == "on" or (mode == "auto" and device.type == "cuda")
    if use and device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise EngineConfigError(
            f"the W4A16 kernels take float16 or bfloat16 activations, not {dtype}; pass dtype float16 or "
            "bfloat16, or int4='off' to serve the packed weights dequantized"
        )
    return use


def _weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = CausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    if cfg.tie_word_embeddings:
        n -= model.lm_head.weight.numel()
    return n * torch.finfo(dtype).bits // 8


def _check_weights_fit(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, model_dir: Path) -> int:
    need = _weight_bytes(cfg, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if need > free:
            raise CacheMemoryError(
                f"{model_dir} needs {need / GIB:.2f} GiB for its weights in {dtype} but {device} has "
                f"{free / GIB:.2f} GiB free of {total / GIB:.2f} GiB; use a quantized (packed) model, "
                "a smaller one, or free the GPU"
            )
    return need


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    verify: bool = False,
    int4: str | None = None,
) -> LoadedModel:
    """Load any servable model directory onto ``device`` (``verify``: check every file's sha256; ``int4``:
    ``auto`` | ``on`` | ``off`` for packed dirs, default ``$LMKILN_INT4`` or ``auto``)."""
    from lmkiln.artifact import read_manifest
    from lmkiln.quant.kv_stats import load_kv_stats

    model_dir = Path(model_dir)
    dev = resolve_device(device) if isinstance(device, str) else device
    kind = artifact_kind(model_dir)
    if kind != "hf_model" or (model_dir / "manifest.json").is_file():
        read_manifest(model_dir, kind=kind, verify=verify)
    internlm2 = kind == "hf_model" and is_internlm2(model_dir)
    if kind == "packed":
        tensors, manifest = _load_packed_tensors(model_dir, verify)
        cfg = ModelConfig.from_dir(model_dir)
    elif internlm2:
        cfg = internlm2_config(model_dir)
    else:
        ckpt = Checkpoint(model_dir)
        cfg = ckpt.config
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg, dev)
    use_int4 = resolve_int4(int4, kind, dev, dt)
    nbytes = _packed_bytes(tensors, cfg, dt) if use_int4 else _check_weights_fit(cfg, dt, dev, model_dir)
    try:
        if use_int4:
            model = _int4_model(cfg, tensors, manifest, dt, dev)
        elif kind == "packed":
            model = _model_from_state(cfg, _unfuse_packed(tensors, manifest, cfg), dt, dev)
        elif internlm2:  # fused wqkv / w1 w3 w2 converted on load
            model = _model_from_state(cfg, internlm2_to_hf(read_internlm2_tensors(model_dir), cfg), dt, dev)
        else:
            model = CausalLM.from_checkpoint(ckpt, dtype=dt, device=dev)
    except torch.OutOfMemoryError as e:
        raise CacheMemoryError(
            f"out of memory loading {model_dir} ({nbytes / GIB:.2f} GiB of {dt} weights) onto {dev}: {e}"
        ) from e
    k_means = load_kv_stats(model_dir, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if k_means is not None:
        for layer, c in zip(model.model.layers, k_means, strict=True):
            layer.self_attn.k_mean = c.to(dev)
    log.info(
        "loaded %s (%s%s, %s layers%s) as %s on %s",
        model_dir, kind, ", int4 linears" if use_int4 else "", cfg.num_layers,
        ", K statistics" if k_means is not None else "", dt, dev,
    )
    return LoadedModel(model, cfg, kind, dt, dev, nbytes, use_int4)


def _load_packed_tensors(model_dir: Path, verify: bool) -> tuple[dict[str, torch.Tensor], dict]:
    from lmkiln.quant.pack import load_packed

    return load_packed(model_dir, verify=verify)


def _unfuse_packed(
    tensors: dict[str, torch.Tensor], manifest: dict, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """HF-named float32 weights from a packed state dict: dequantize, then split fused linears."""
    from lmkiln.quant.pack import dequantize_packed

    fused: dict[str, list[str]] = manifest.get("fused") or {}
    sizes: dict[str, list[int]] = manifest.get("fused_sizes") or {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith((".sz", ".zeros")):
            continue
        if not name.endswith((".qweight", ".bias")) or not _is_packed_linear(tensors, name):
            out[name] = t
            continue
        prefix, suffix = name.rsplit(".", 1)
        layer, target = prefix.split(".", 3)[:3], prefix.split(".", 3)[3]
        base = ".".join(layer)
        w = dequantize_packed(t, tensors[f"{prefix}.sz"]).t() if suffix == "qweight" else t.float()
        real_k = (manifest.get("padded_in_features") or {}).get(target)
        if suffix == "qweight" and real_k:  # the packer padded K with zero weights
            w = w[:, :real_k]
        parts = fused.get(target, [target])
        splits = sizes.get(target, [w.shape[0]])
        if len(parts) != len(splits) or sum(splits) != w.shape[0]:
            raise ArtifactError(
                f"{prefix}: manifest says {target} fuses {parts} of sizes {splits}, but it has {w.shape[0]} "
                "output features; rebuild the packed artifact"
            )
        for part, piece in zip(parts, w.split(splits, dim=0), strict=True):
            out[f"{base}.{part}.{'weight' if suffix == 'qweight' else 'bias'}"] = piece.contiguous()
    return out


def _is_packed_linear(tensors: dict[str, torch.Tensor], name: str) -> bool:
    return f"{name.rsplit('.', 1)[0]}.qweight" in tensors and name.startswith("model.layers.")


def _packed_bytes(tensors: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes the int4 model takes: packed linears as stored, everything else in ``dtype``."""
    n = 0
    for name, t in tensors.items():
        if _is_packed_linear(tensors, name) or name.endswith((".qweight", ".sz", ".zeros")):
            n += t.numel() * t.element_size()
        else:
            n += t.numel() * torch.finfo(dtype).bits // 8
    if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        n += cfg.vocab_size * cfg.hidden_size * torch.finfo(dtype).bits // 8
    return n


def _int4_model(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    manifest: dict,
    dtype: torch.dtype,
    device: torch.device,
) -> CausalLM:
    """The model with ``Int4Linear`` over the packed (fused) linears; the rest loaded in ``dtype``."""
    from lmkiln.layers import Int4Linear
    from lmkiln.quant.pack import FUSED_LINEARS, SINGLE_LINEARS

    fused: dict[str, list[str]] = manifest.get("fused") or {}
    if {k: list(v) for k, v in FUSED_LINEARS.items()} != fused:
        raise ArtifactError(
            f"the packed manifest fuses {fused}, this lmkiln serves {dict(FUSED_LINEARS)}; "
            "rebuild the artifact"
        )
    padded = manifest.get("padded_in_features") or {}
    expect_n = {
        "self_attn.qkv_proj": cfg.q_size + 2 * cfg.kv_size,
        "mlp.gate_up_proj": 2 * cfg.intermediate_size,
        "self_attn.o_proj": cfg.hidden_size,
        "mlp.down_proj": cfg.hidden_size,
    }
    layers: list[list[Int4Linear]] = []
    for i in range(cfg.num_layers):
        mods = []
        for target in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            prefix = f"model.layers.{i}.{target}"
            lin = Int4Linear.from_packed(tensors, prefix, padded.get(target))
            if lin.out_features != expect_n[target]:
                raise ArtifactError(
                    f"{prefix} has {lin.out_features} output features, config.json implies "
                    f"{expect_n[target]}; the packed artifact and its config do not match"
                )
            if lin.bias is not None:
                lin.bias = lin.bias.to(dtype)
            mods.append(lin)
        layers.append(mods)
    targets = (*FUSED_LINEARS, *SINGLE_LINEARS)
    state = {n: t for n, t in tensors.items() if not n.startswith(tuple(
        f"model.layers.{i}.{t}." for i in range(cfg.num_layers) for t in targets))}
    return _model_from_state(cfg, state, dtype, device, layers)


def _model_from_state(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    fused_layers: list | None = None,
) -> CausalLM:
    """``fused_layers[i]``: (qkv, o, gate_up, down) modules that replace layer ``i``'s linears."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    for layer, mods in zip(model.model.layers, fused_layers or [], strict=False):
        layer.fuse(*mods)
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = {n for n, _ in model.named_parameters()} | {"lm_head.weight"}
    missing = sorted(expected - set(state))
    if missing:
        raise ArtifactError(f"the checkpoint lacks {missing[:4]}{'…' if len(missing) > 4 else ''}")
    params = dict(model.named_parameters())
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise ArtifactError(
                f"{n} has shape {tuple(state[n].shape)}, config.json implies {tuple(p.shape)}"
            )
    model.load_state_dict({n: state[n].to(dtype) for n in params}, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = Rotary(cfg)
    return model.to(device).eval()
