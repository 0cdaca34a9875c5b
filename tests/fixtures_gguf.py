"""A tiny GGUF chat model: the offline stand-in for a user's GGUF checkpoint (SmolLM2's file is 98 MB and takes
~20 s to load). A 2-layer Llama and a byte-level BPE tokenizer with a chat template, written as llama.cpp
writes them (tensor names, q/k rows permuted for its rotary layout, the tokenizer in the metadata), so
transformers reads them back through its own GGUF loader."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HEADS, KV_HEADS, LAYERS, HIDDEN, FFN = 4, 2, 2, 32, 64
# llama.cpp's names of a Llama's weights (transformers' name -> the file's)
NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of q/k rows (the rotary halves interleaved); transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tiny_gguf(tokenizer, chat_template: str, out_dir: Path, name: str = "tiny-chat.F32.gguf",
                    seed: int = 0) -> Path:
    """``out_dir/name``: a random tiny Llama with ``tokenizer`` (a byte-level BPE with <pad>, <bos>, <eos>) and
    ``chat_template``; ``out_dir`` holds nothing else (no config.json), as a downloaded GGUF folder."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = spec["vocab"]
    # GPT2Tokenizer, which transformers builds from a byte-level GGUF vocabulary, adds <|endoftext|> when the
    # vocabulary lacks it (as real GPT-2-style vocabularies have it): one more token than the model's embedding.
    tokens = sorted(vocab, key=vocab.get) + ([] if "<|endoftext|>" in vocab else ["<|endoftext|>"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                                         tie_word_embeddings=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_dir / name), "llama")
    writer.add_name("tiny-chat")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in ("<pad>", "<bos>", "<eos>", "<|endoftext|>") else 1 for t in tokens])  # 3: control
    writer.add_bos_token_id(vocab["<bos>"])
    writer.add_eos_token_id(vocab["<eos>"])
    writer.add_pad_token_id(vocab["<pad>"])
    writer.add_chat_template(chat_template)
    names = dict(NAMES)
    for i in range(LAYERS):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in LAYER_NAMES.items()})
    for key, value in model.state_dict().items():
        w = value.numpy().astype(np.float32)
        if key.endswith("q_proj.weight"):
            w = permute(w, HEADS)
        elif key.endswith("k_proj.weight"):
            w = permute(w, KV_HEADS)
        writer.add_tensor(names[key], w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_dir / name
