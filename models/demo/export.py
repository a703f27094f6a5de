"""Write a trained :class:`model.TinyLlama` as a llama.cpp GGUF file.

The vocabulary must be byte-identical to SmolLM2's so that the three demo models can be
fused token by token; every ``tokenizer.*`` key of SmolLM2's GGUF is therefore copied
verbatim (tokens, token types, merges, special ids, flags, pre-tokenizer, chat template).

Weights need no reordering: the model's RoPE already uses llama.cpp's adjacent-pair form
(see ``model.py``) and torch's ``Linear`` layout ``(out, in)`` is what GGUF expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from common import smollm2_gguf
from model import TinyLlama

WeightType = Literal["f32", "f16", "q8_0"]

FILE_TYPES: dict[WeightType, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# torch parameter suffix -> llama.cpp tensor suffix inside block N
BLOCK_TENSORS: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wq.weight": "attn_q.weight",
    "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight",
    "attn.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.gate.weight": "ffn_gate.weight",
    "ffn.up.weight": "ffn_up.weight",
    "ffn.down.weight": "ffn_down.weight",
}


def gguf_name(torch_name: str) -> str:
    """Map a ``TinyLlama`` state-dict key to its llama.cpp tensor name."""
    if torch_name == "embed.weight":
        return "token_embd.weight"
    if torch_name == "norm.weight":
        return "output_norm.weight"
    _, index, rest = torch_name.split(".", 2)
    return f"blk.{index}.{BLOCK_TENSORS[rest]}"


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copy every ``tokenizer.*`` key of ``source`` into ``writer``; return the count."""
    reader = gguf.GGUFReader(source)
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
        copied += 1
    return copied


def encode_tensor(weight: np.ndarray, weight_type: WeightType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Data and storage type of one tensor.

    Norm gains (1-D) stay F32, as in llama.cpp's own converters; matrices take the
    requested type.
    """
    if weight.ndim == 1 or weight_type == "f32":
        return weight.astype(np.float32), gguf.GGMLQuantizationType.F32
    if weight_type == "f16":
        return weight.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(weight.astype(np.float32), qtype), qtype


def write_gguf(
    model: TinyLlama,
    path: Path,
    name: str,
    weight_type: WeightType = "q8_0",
    context_length: int = 2048,
) -> Path:
    """Write ``model`` to ``path`` as a ``llama``-architecture GGUF file.

    ``context_length`` is what llama.cpp advertises; the model was trained on
    ``model.cfg.block_size`` positions and positions beyond that are extrapolation.
    """
    cfg = model.cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[weight_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    copy_tokenizer(writer, smollm2_gguf())

    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            data, qtype = encode_tensor(tensor.float().numpy(), weight_type)
            writer.add_tensor(gguf_name(key), data, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
