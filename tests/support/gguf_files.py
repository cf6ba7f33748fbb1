"""Write GGUF files as llama.cpp's converter does, for the importer's tests.

Real GGUF files are 100 MB; a tiny Llama written here (float32 tensors, the
query/key rows permuted into llama.cpp's rotary layout, a byte-level BPE
vocabulary with its merges) checks the whole import path in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (HF rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, path: Path, architecture: str = "llama", chat_template: str | None = None) -> Path:
    """Write the HF Llama in ``model_dir`` (with its BPE tokenizer.json) as a GGUF file at ``path``."""
    from gguf import GGUFWriter, TokenType
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = GGUFWriter(str(path), architecture)
    w.add_name("tiny test llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(config.eos_token_id)
    w.add_bos_token_id(config.eos_token_id)
    if config.pad_token_id is not None:
        w.add_pad_token_id(config.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, t in model.state_dict().items():
        a = t.numpy()
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            out = "output.weight"
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                a = _permute(a, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = _permute(a, config.num_key_value_heads)
            out = f"blk.{i}.{layer[module]}.{suffix}"
        else:
            module, suffix = name.removeprefix("model.").rsplit(".", 1)
            out = f"{names[module]}.{suffix}"
        w.add_tensor(out, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
