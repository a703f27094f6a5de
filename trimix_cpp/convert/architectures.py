"""What each supported model family looks like in a checkpoint and what llama.cpp expects instead.

Three GGUF architectures cover the paper's four families:

* ``qwen2``: Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``). Q, K and V carry biases; the small models
  tie the output layer to the token embedding, the 7B does not.
* ``llama``: Llama 2 and Llama 3.x (``LlamaForCausalLM``). llama.cpp rotates *adjacent* pairs of
  each head for RoPE while the checkpoint's layout rotates the two *halves*, so the rows of Q and K
  are permuted within each head. Llama 3.1+ scale RoPE's low frequencies ("llama3" rope scaling):
  llama.cpp takes that as a ``rope_freqs`` tensor of per-frequency divisors, computed here.
* ``gemma3``: Gemma 3 text models (``Gemma3ForCausalLM``, and the text half of
  ``Gemma3ForConditionalGeneration``). Its RMSNorm multiplies by ``1 + w``, llama.cpp's by ``w``,
  so every norm weight gains 1; it adds norms after attention and after the MLP and on each head's Q
  and K; five of every six layers attend through a sliding window, whose layout is written per layer.

Each family is described by data (the expected tensors with their shapes, the hyper-parameters)
so that a checkpoint that does not match its own ``config.json`` is refused with the tensor named,
before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from .checkpoint import CheckpointError

__all__ = ["SUPPORTED_ARCHITECTURES", "Family", "TensorPlan", "UnsupportedArchitectureError", "family_for"]

# config.json "architectures" entry -> GGUF architecture
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}
FAMILY_NAMES = "Qwen2/Qwen2.5 (Qwen2ForCausalLM), Llama 2 and 3.x (LlamaForCausalLM), Gemma 3 text (Gemma3ForCausalLM)"
OTHERS = "for other architectures use llama.cpp's convert_hf_to_gguf.py"

# Tensors a checkpoint may carry that the GGUF does not need.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# The vision half of Gemma 3's multimodal checkpoints; only the text model is converted.
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class UnsupportedArchitectureError(CheckpointError):
    """config.json names a model architecture this converter does not know."""


@dataclass
class TensorPlan:
    """One output tensor: its source, its GGUF name and shape, and what happens to it on the way."""

    source: str  # checkpoint tensor name ("" for a tensor computed here)
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order (rows first), after any row truncation
    head_dim: int = 0  # > 0: permute rows within heads of this size (llama's Q and K)
    add_one: bool = False  # Gemma's norm weights: store 1 + w
    computed: np.ndarray | None = None  # data made by the converter itself (rope_freqs)
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    nbytes: int = 0

    @property
    def keeps_f32(self) -> bool:
        """Vectors and norms stay F32 whatever the output type, as llama.cpp's kernels expect."""
        return len(self.shape) <= 1 or self.name.endswith("_norm.weight") or self.computed is not None


@dataclass
class Family:
    """The conventions of one architecture; built from a checkpoint's config by :func:`family_for`."""

    arch: str
    hf_arch: str
    config: dict[str, Any]
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    tied: bool
    norm_eps: float
    rope_theta: float
    n_ctx: int
    extra_keys: list[Callable[[gguf.GGUFWriter], None]] = field(default_factory=list)
    qkv_bias: bool = False
    permute_qk: bool = False
    gemma: bool = False
    rope_freqs: np.ndarray | None = None

    # -- hyper-parameters ------------------------------------------------------------------------

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        """The architecture keys llama.cpp reads to build the model."""
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(self.norm_eps)
        w.add_rope_freq_base(self.rope_theta)
        w.add_rope_dimension_count(self.head_dim)
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_vocab_size(self.n_vocab)
        for add in self.extra_keys:
            add(w)

    # -- tensors ---------------------------------------------------------------------------------

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every GGUF tensor the model needs, with its shape in numpy order, before vocabulary trimming."""
        d, hd = self.n_embd, self.head_dim
        out: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, d), "output_norm.weight": (d,)}
        if not self.tied:
            out["output.weight"] = (self.n_vocab, d)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            out[b + "attn_norm.weight"] = (d,)
            out[b + "attn_q.weight"] = (self.n_head * hd, d)
            out[b + "attn_k.weight"] = (self.n_head_kv * hd, d)
            out[b + "attn_v.weight"] = (self.n_head_kv * hd, d)
            out[b + "attn_output.weight"] = (d, self.n_head * hd)
            out[b + "ffn_norm.weight"] = (d,)
            out[b + "ffn_gate.weight"] = (self.n_ff, d)
            out[b + "ffn_up.weight"] = (self.n_ff, d)
            out[b + "ffn_down.weight"] = (d, self.n_ff)
            if self.qkv_bias:
                out[b + "attn_q.bias"] = (self.n_head * hd,)
                out[b + "attn_k.bias"] = (self.n_head_kv * hd,)
                out[b + "attn_v.bias"] = (self.n_head_kv * hd,)
            if self.gemma:
                out[b + "attn_q_norm.weight"] = (hd,)
                out[b + "attn_k_norm.weight"] = (hd,)
                out[b + "post_attention_norm.weight"] = (d,)
                out[b + "post_ffw_norm.weight"] = (d,)
        return out

    def plan_tensors(self, names: list[str]) -> list[TensorPlan]:
        """Map the checkpoint's tensor names to GGUF tensors, refusing anything missing or unknown."""
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch.upper()], self.n_layer)
        expected = self.expected()
        plans: dict[str, TensorPlan] = {}
        for src in names:
            if src.endswith(_IGNORED_SUFFIXES) or src.startswith(_VISION_PREFIXES):
                continue
            hf = _text_model_name(src)
            if hf == "lm_head.weight" and self.tied:
                continue  # a tied model may still store the copy; llama.cpp reuses token_embd
            new = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if new is None or new not in expected:
                raise CheckpointError(
                    f"tensor {src} is not part of a {self.hf_arch} model as config.json describes it "
                    "(the weights and config.json do not belong together, or the model has parts this converter "
                    f"does not handle; {OTHERS})"
                )
            if new in plans:
                raise CheckpointError(
                    f"tensors {plans[new].source} and {src} are both {new}; the checkpoint is damaged"
                )
            plans[new] = TensorPlan(
                source=src,
                name=new,
                shape=expected[new],
                head_dim=self.head_dim if self.permute_qk and new.endswith(("attn_q.weight", "attn_k.weight")) else 0,
                add_one=self.gemma and new.endswith("norm.weight"),
            )
        missing = [n for n in expected if n not in plans]
        if missing:
            hint = " (config.json says tie_word_embeddings is false)" if missing[0] == "output.weight" else ""
            raise CheckpointError(
                f"the checkpoint has no tensor for {missing[0]}{hint}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + ": the download is incomplete or does not match config.json"
            )
        ordered = [plans[n] for n in expected]
        if self.rope_freqs is not None:
            ordered.insert(
                0,
                TensorPlan("", "rope_freqs.weight", self.rope_freqs.shape, computed=self.rope_freqs.astype(np.float32)),
            )
        return ordered


def _text_model_name(name: str) -> str:
    """The name a text-only checkpoint would use (multimodal Gemma 3 nests the text model)."""
    for prefix, repl in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    return name


# -- reading config.json ---------------------------------------------------------------------------


def family_for(config: dict[str, Any]) -> Family:
    """The family of a checkpoint from its config.json, or one line naming what is supported."""
    archs = config.get("architectures")
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        what = f"architecture {hf_arch}" if hf_arch else "no architecture"
        raise UnsupportedArchitectureError(f"config.json names {what}; trimix converts {FAMILY_NAMES}; {OTHERS}")
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict):  # multimodal Gemma 3: the text model's settings
        cfg = {**cfg, **cfg["text_config"]}
    return {"qwen2": _qwen2, "llama": _llama, "gemma3": _gemma3}[arch](hf_arch, cfg)


def _int(cfg: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json has no {key} (download the checkpoint's config.json again)")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"config.json: {key} must be a whole number of at least {minimum}, got {value!r}")
    return value


def _float(cfg: dict[str, Any], key: str, default: float) -> float:
    value = cfg.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _common(arch: str, hf_arch: str, cfg: dict[str, Any], *, tied_default: bool, theta_default: float) -> Family:
    n_embd = _int(cfg, "hidden_size")
    n_head = _int(cfg, "num_attention_heads")
    n_head_kv = _int(cfg, "num_key_value_heads", n_head)
    if n_head % n_head_kv:
        raise CheckpointError(
            f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}"
        )
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if n_embd % n_head:
            raise CheckpointError(
                f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}"
            )
        head_dim = n_embd // n_head
    head_dim = _int({"head_dim": head_dim}, "head_dim")
    if head_dim % 2:
        raise CheckpointError(f"config.json: head_dim {head_dim} is odd; RoPE needs an even head size")
    tied = cfg.get("tie_word_embeddings", tied_default)
    if not isinstance(tied, bool):
        raise CheckpointError(f"config.json: tie_word_embeddings must be true or false, got {tied!r}")
    return Family(
        arch=arch,
        hf_arch=hf_arch,
        config=cfg,
        n_layer=_int(cfg, "num_hidden_layers"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=_int(cfg, "intermediate_size"),
        n_vocab=_int(cfg, "vocab_size"),
        tied=tied,
        norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
        rope_theta=_float(cfg, "rope_theta", theta_default),
        n_ctx=_int(cfg, "max_position_embeddings", 4096),
    )


def _activation(cfg: dict[str, Any], allowed: tuple[str, ...], default: str) -> None:
    act = cfg.get("hidden_act", cfg.get("hidden_activation")) or default
    if act not in allowed:
        raise CheckpointError(
            f"config.json: activation {act!r} is not what this family uses ({', '.join(allowed)}); {OTHERS}"
        )


def _rope_scaling(cfg: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in allowed:
        raise CheckpointError(
            f"config.json: rope_scaling type {kind!r} is not supported here (this family: "
            f"{', '.join(allowed) or 'none'}); {OTHERS}"
        )
    return {**rs, "rope_type": kind}


def _add_linear_scaling(fam: Family, rs: dict[str, Any]) -> None:
    factor = _float(rs, "factor", 1.0)

    def add(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)

    fam.extra_keys.append(add)


def _qwen2(hf_arch: str, cfg: dict[str, Any]) -> Family:
    fam = _common("qwen2", hf_arch, cfg, tied_default=False, theta_default=10000.0)
    _activation(cfg, ("silu",), "silu")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(
            "config.json: use_sliding_window is true, which llama.cpp's qwen2 does not implement "
            "(Qwen2.5's own configs set it false)"
        )
    if fam.head_dim * fam.n_head != fam.n_embd:
        raise CheckpointError("config.json: qwen2 needs head_dim x num_attention_heads = hidden_size")
    fam.qkv_bias = True
    if rs := _rope_scaling(cfg, ("linear",)):
        _add_linear_scaling(fam, rs)
    return fam


def _llama(hf_arch: str, cfg: dict[str, Any]) -> Family:
    fam = _common("llama", hf_arch, cfg, tied_default=False, theta_default=10000.0)
    _activation(cfg, ("silu",), "silu")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"config.json: {key} is true, which Llama 2 and 3 do not use; {OTHERS}")
    fam.permute_qk = True
    rs = _rope_scaling(cfg, ("linear", "llama3"))
    if rs and rs["rope_type"] == "linear":
        _add_linear_scaling(fam, rs)
    elif rs:
        fam.rope_freqs = llama3_rope_divisors(fam.head_dim, fam.rope_theta, rs)
    return fam


def llama3_rope_divisors(head_dim: int, theta: float, rs: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1+'s RoPE: long wavelengths are slowed by ``factor``, short
    ones kept, the band between blended; llama.cpp divides each rotation frequency by its entry."""
    factor = _float(rs, "factor", 8.0)
    low = _float(rs, "low_freq_factor", 1.0)
    high = _float(rs, "high_freq_factor", 4.0)
    old_ctx = _float(rs, "original_max_position_embeddings", 8192.0)
    if high <= low:
        raise CheckpointError("config.json: rope_scaling high_freq_factor must exceed low_freq_factor")
    freqs = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    return out.astype(np.float32)


def _gemma3(hf_arch: str, cfg: dict[str, Any]) -> Family:
    # Gemma3TextConfig's defaults, for the keys its published configs sometimes leave out
    cfg = {"head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 4, **cfg}
    fam = _common("gemma3", hf_arch, cfg, tied_default=True, theta_default=1_000_000.0)
    fam.n_ctx = _int(cfg, "max_position_embeddings", 131072)
    _activation(cfg, ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
    fam.gemma = True
    if cfg.get("attn_logit_softcapping") is not None:
        raise CheckpointError("config.json: attn_logit_softcapping is set, which Gemma 3 does not use; " + OTHERS)
    scalar = cfg.get("query_pre_attn_scalar", fam.head_dim)
    # llama.cpp scales queries by 1/sqrt(head_dim), except for its 27B (62 layers): 1/sqrt(hidden/heads)
    llama_cpp_scalar = fam.n_embd // fam.n_head if fam.n_layer == 62 else fam.head_dim
    if scalar != llama_cpp_scalar:
        raise CheckpointError(
            f"config.json: query_pre_attn_scalar {scalar!r} differs from the {llama_cpp_scalar} llama.cpp uses "
            "for this Gemma 3 shape, so the converted model would compute differently"
        )
    if rs := _rope_scaling(cfg, ("linear",)):
        _add_linear_scaling(fam, rs)
    local_theta = _float(cfg, "rope_local_base_freq", 10000.0)
    window = _int(cfg, "sliding_window", 4096)
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        pattern = _int(cfg, "sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(fam.n_layer)]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != fam.n_layer
        or any(t not in ("sliding_attention", "full_attention") for t in layer_types)
    ):
        raise CheckpointError(
            f"config.json: layer_types must list sliding_attention or full_attention for each of {fam.n_layer} layers"
        )
    is_swa = [t == "sliding_attention" for t in layer_types]
    softcap = cfg.get("final_logit_softcapping")

    def add(w: gguf.GGUFWriter) -> None:
        if any(is_swa):  # llama.cpp builds a sliding-window cache only for a model that has such layers
            w.add_sliding_window(window)
            w.add_sliding_window_pattern(is_swa)
            w.add_rope_freq_base_swa(local_theta)
        if softcap:
            w.add_final_logit_softcapping(float(softcap))

    fam.extra_keys.append(add)
    return fam
