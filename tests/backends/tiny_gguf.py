"""Turn the tiny Hugging Face Llama folder from `tiny_model.py` into a GGUF file for llama.cpp.

Runs in the main venv (numpy, safetensors, gguf; no torch, nothing downloaded). What it writes is what
llama.cpp's own `convert_hf_to_gguf.py` writes for a Llama with a byte-level BPE tokenizer: arch `llama`,
F32 tensors under GGUF names, q/k rows permuted from Hugging Face's rotary layout to llama.cpp's, and a
"gpt2" tokenizer (tokens, merges, token types, bos/eos/unk/pad ids, pre-tokenizer "gpt-2", which is the
regex that Hugging Face's ByteLevel pre-tokenizer uses) with the chat template from tokenizer_config.json.

    python -m tests.backends.tiny_gguf MODEL_DIR OUT.gguf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k rows (halves per head) to llama.cpp's interleaved rotary layout (as convert_hf_to_gguf)."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _vocab(model_dir: Path) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """Tokens in id order, their GGUF token types, merges as "a b" strings, and the ids by token text."""
    tokenizer = _read_json(model_dir / "tokenizer.json")
    model = tokenizer["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer in {model_dir}, got {model.get('type')!r}")
    ids: dict[str, int] = dict(model["vocab"])
    types: dict[int, int] = {}
    for added in tokenizer.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    by_id = {i: token for token, i in ids.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"token ids in {model_dir / 'tokenizer.json'} are not 0..{len(by_id) - 1}")
    tokens = [by_id[i] for i in range(len(by_id))]
    token_types = [types.get(i, int(gguf.TokenType.NORMAL)) for i in range(len(tokens))]
    # tokenizers >= 0.20 saves merges as [left, right] pairs, older ones as "left right" strings
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, token_types, merges, ids


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in some tokenizer_config.json files
        return str(value.get("content"))
    return value if isinstance(value, str) else None


def write_gguf(model_dir: Path, out_file: Path) -> Path:
    """Write `out_file` (a llama GGUF, all tensors F32) from the Hugging Face folder `model_dir`; return it."""
    config = _read_json(model_dir / "config.json")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    tokens, token_types, merges, ids = _vocab(model_dir)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("vocab_size", len(tokens)) != len(tokens):
        raise ValueError(f"config.json says vocab_size {config['vocab_size']}, the tokenizer has {len(tokens)}")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), ARCH_NAME)
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        text = _token_text(tokenizer_config.get(key))
        if text is not None and text in ids:
            add(ids[text])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])

    names = gguf.get_tensor_name_map(ARCH, layers)
    for name, tensor in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        data = tensor
        if name.endswith("self_attn.q_proj.weight"):
            data = permute_rotary(tensor, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = permute_rotary(tensor, kv_heads)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        writer.add_tensor(new_name, np.ascontiguousarray(data, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.backends.tiny_gguf MODEL_DIR OUT.gguf")
    print(write_gguf(Path(sys.argv[1]), Path(sys.argv[2])))
