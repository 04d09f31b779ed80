"""A tiny Llama with random weights and a locally trained tokenizer, for real inference servers in tests.

Nothing is downloaded: the byte-level BPE tokenizer is trained here on generated text, the weights are
seeded random numbers, and the folder is laid out as Hugging Face's `LlamaForCausalLM` expects, so
vLLM serves it as is (and `tests/backends/tiny_gguf.py` turns it into a GGUF for llama.cpp). The text
it generates is noise; tests check protocol, streaming, usage and charges, never the words.

    python -m tests.backends.tiny_model OUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 2
HEAD_DIM = 32  # vLLM's CPU attention backend refuses head sizes below 32
MAX_POSITIONS = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_TEXT = ("the model answers a question about tokens streams usage and billing for research projects on "
         "institutional GPUs with open weights served by vLLM Ollama and llama.cpp through one gateway "
         "hello world count to ten say something write a short poem about the sea 你好 世界 模型 專案 計費 "
         "金鑰 用量 研究 台灣 語言 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ( ) { } [ ] \" ' - _ / \\")
WORDS = tuple(_TEXT.split())


def corpus(lines: int = 4000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(lines)]


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def random_weights(vocab: int, seed: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    attention = HEADS * HEAD_DIM
    tensors = {"model.embed_tokens.weight": matrix(vocab, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32),
               "lm_head.weight": matrix(vocab, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        tensors |= {
            layer + "self_attn.q_proj.weight": matrix(attention, HIDDEN),
            layer + "self_attn.k_proj.weight": matrix(attention, HIDDEN),
            layer + "self_attn.v_proj.weight": matrix(attention, HIDDEN),
            layer + "self_attn.o_proj.weight": matrix(HIDDEN, attention),
            layer + "mlp.gate_proj.weight": matrix(INTERMEDIATE, HIDDEN),
            layer + "mlp.up_proj.weight": matrix(INTERMEDIATE, HIDDEN),
            layer + "mlp.down_proj.weight": matrix(HIDDEN, INTERMEDIATE),
            layer + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            layer + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
        }
    return tensors


def write(out: Path) -> Path:
    """Write the model folder (idempotent: the same bytes every time) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "head_dim": HEAD_DIM,
        "vocab_size": vocab, "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False,
        "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "unk_token": "<unk>",
        "pad_token": EOS, "add_bos_token": False, "add_eos_token": False, "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": "<unk>",
                                                   "pad_token": EOS})
    save_file(random_weights(vocab), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
