"""Write a trained :class:`model.TinyLlama` as a llama.cpp GGUF file, through trimix's own converter.

The model is saved as the Hugging Face checkpoint a ``LlamaForCausalLM`` of its shape would be
(``config.json``, ``model.safetensors``, tokenizer files) in a temporary folder, and
``trimix_cpp.convert.convert_checkpoint`` turns that folder into the GGUF file: the demo's files come
out of the same writer as every model a user converts, and the export exercises it end to end.

Two things make the checkpoint faithful:

* Vocabulary: the three demo models must share SmolLM2's vocabulary byte for byte so they can be
  fused token by token. The tokenizer files are rebuilt from the ``tokenizer.*`` keys of SmolLM2's
  own GGUF (tokens, merges, control tokens, its pre-tokenizer: single digits, then GPT-2's byte-level
  split; special tokens and chat template in ``tokenizer_config.json``), and the converter turns
  them back into those keys.
* RoPE: ``model.py`` rotates adjacent pairs of each head, llama.cpp's layout, while a Hugging Face
  Llama rotates the two halves and the converter permutes Q and K rows from halves to pairs. The
  checkpoint therefore holds Q and K in the halves layout (the inverse permutation, exact), which is
  what a Hugging Face Llama computing the same function would store, and the GGUF gets the model's
  own rows back.

Only numpy is needed here (``write_gguf`` takes the torch model but uses nothing of torch beyond
its ``state_dict``), so ``export_state`` also runs where torch is not installed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import gguf
import numpy as np
from common import smollm2_gguf

from trimix_cpp.convert import convert_checkpoint

if TYPE_CHECKING:
    from model import TinyLlama

WeightType = Literal["f32", "f16", "q8_0"]

# torch parameter suffix inside block N -> Hugging Face Llama name suffix inside layer N
BLOCK_TENSORS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate.weight": "mlp.gate_proj.weight",
    "ffn.up.weight": "mlp.up_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
}
# Pre-tokenizer of SmolLM2's tokenizer.json: each digit alone, then GPT-2's byte-level regex split.
SMOLLM2_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
_BYTE_LEVEL: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


class Shape(Protocol):
    """The fields of ``model.ModelConfig`` the checkpoint's config.json is made of."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    rope_base: float
    rms_eps: float

    @property
    def head_dim(self) -> int: ...


def hf_name(torch_name: str) -> str:
    """Map a ``TinyLlama`` state-dict key to its Hugging Face Llama tensor name."""
    if torch_name == "embed.weight":
        return "model.embed_tokens.weight"
    if torch_name == "norm.weight":
        return "model.norm.weight"
    _, index, rest = torch_name.split(".", 2)
    return f"model.layers.{index}.{BLOCK_TENSORS[rest]}"


def pairs_to_halves(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows of Q or K from llama.cpp's adjacent-pair RoPE layout to Hugging Face's halves layout.

    Within each head, row ``2i + j`` (pair ``i``, member ``j``) moves to row ``j * head_dim / 2 + i``;
    the converter's permutation is exactly the reverse.
    """
    rows, cols = weight.shape
    heads = rows // head_dim
    return weight.reshape(heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """A float32 safetensors file: an 8-byte header length, the JSON header, then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t, dtype="<f4").tobytes())


def write_tokenizer_files(folder: Path, source: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of SmolLM2, rebuilt from its GGUF ``source``."""
    reader = gguf.GGUFReader(source)

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type")
    if field("tokenizer.ggml.model") != "gpt2" or field("tokenizer.ggml.pre") != "smollm":
        raise RuntimeError(f"{source} does not hold SmolLM2's byte-level tokenizer")
    control = [i for i, k in enumerate(types) if k == gguf.TokenType.CONTROL]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in control
        ],
        "normalizer": None,
        "pre_tokenizer": SMOLLM2_PRE_TOKENIZER,
        "post_processor": _BYTE_LEVEL,
        "decoder": _BYTE_LEVEL,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": field("tokenizer.ggml.merges"),
        },
    }
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
        "bos_token": tokens[field("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[field("tokenizer.ggml.eos_token_id")],
        "unk_token": tokens[field("tokenizer.ggml.unknown_token_id")],
        "pad_token": tokens[field("tokenizer.ggml.padding_token_id")],
        "chat_template": field("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")


def write_model_card(folder: Path, name: str, n_params: int) -> None:
    """A ``README.md`` whose front matter gives the GGUF's ``general.name`` and size label (the converter
    reads the model card; without one it would guess both from the folder's name)."""
    size = gguf.size_label(n_params, 0, 0, 0)
    card = f"---\nmodel_name: {name}\nsize_label: {size}\n---\n\n# {name}\n\nA small model of trimix's demo trio.\n"
    (folder / "README.md").write_text(card, encoding="utf-8")


def save_checkpoint(
    state: Mapping[str, np.ndarray], cfg: Shape, folder: Path, context_length: int = 2048, name: str | None = None
) -> Path:
    """Write ``state`` (``TinyLlama`` state-dict keys, float32 arrays) as a Hugging Face Llama checkpoint;
    ``name`` (default: the folder's name) is the model's name in its model card."""
    folder.mkdir(parents=True, exist_ok=True)
    write_model_card(folder, name or folder.name, sum(int(np.asarray(w).size) for w in state.values()))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context_length,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_base,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    tensors: dict[str, np.ndarray] = {}
    for key, weight in state.items():
        w = np.asarray(weight, dtype=np.float32)
        if key.endswith(("attn.wq.weight", "attn.wk.weight")):
            w = pairs_to_halves(w, cfg.head_dim)
        tensors[hf_name(key)] = w
    write_safetensors(folder / "model.safetensors", tensors)
    write_tokenizer_files(folder, smollm2_gguf())
    return folder


def export_state(
    state: Mapping[str, np.ndarray],
    cfg: Shape,
    path: Path,
    name: str,
    weight_type: WeightType = "q8_0",
    context_length: int = 2048,
) -> Path:
    """Write ``state`` to ``path`` as a ``llama``-architecture GGUF file (replacing it), via a checkpoint.

    ``name`` becomes ``general.name`` (the checkpoint folder is named after it); ``context_length`` is
    what llama.cpp advertises. Matrices take ``weight_type``, norm gains stay F32 (the converter's rule).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trimix-demo-export-") as tmp:
        folder = save_checkpoint(state, cfg, Path(tmp) / name, context_length, name)
        return convert_checkpoint(folder, path, out_type=weight_type, force=True)


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
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    return export_state(state, model.cfg, path, name, weight_type, context_length)
