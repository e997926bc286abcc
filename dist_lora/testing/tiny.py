"""Tiny Hugging Face models with random weights, built offline, for tests, demos and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Small configs of each supported family. The Llama vocabulary (101) is prime, so no TP size
# divides it; Mistral uses a sliding window shorter than the test sequences; Qwen2 has q/k/v
# biases and tied embeddings; Qwen3 has q/k norms and a head_dim (16) other than hidden / heads
# (12); Gemma 3 has Gemma's real 262k vocabulary, a sliding window (4) shorter than the test
# sequences on layers 0 and 1 and full attention on layer 2 (each with its own RoPE base), an
# attention scale from query_pre_attn_scalar (24) other than head_dim, and tied embeddings.
# The 3- and 5-layer Llamas have layer counts that PP=2 does not divide (uneven stages).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=101, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=128, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=5,
                    tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=96, hidden_size=64,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                  use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=120, hidden_size=48,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, use_sliding_window=False),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144,
                   hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                   sliding_window_pattern=3, max_position_embeddings=128, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True),
}
TINY_CONFIGS["llama_3_layers"] = dict(TINY_CONFIGS["llama"], num_hidden_layers=3)
TINY_CONFIGS["llama_5_layers"] = dict(TINY_CONFIGS["llama"], num_hidden_layers=5)


def hf_model(config: dict, seed: int = 0, std: float = 0.1):
    """An HF causal LM from a config dict, every parameter drawn from N(0, std^2) with ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model.eval()


def save_tiny(config: dict | str | Path, out_dir: str | Path, seed: int = 0,
              max_shard_size: str | None = None):
    """Build an HF model (config dict or JSON path) and save it to ``out_dir``; return it."""
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    model = hf_model(config, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    return model


# A ChatML template (SmolLM2 / Qwen style) that, like many real ones, rejects unknown roles.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIALS = ("<unk>", "<pad>", "<|im_start|>", "<|im_end|>")
CHAT_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'-\n"


def save_chat_tokenizer(out_dir: str | Path, chat_template: str | None = CHATML_TEMPLATE):
    """A character-level fast tokenizer (50 ids: 4 specials, then lower-case letters, digits,
    space, punctuation, newline) with a ChatML ``chat_template``, built offline with ``tokenizers``
    and saved to ``out_dir``; EOS is ``<|im_end|>``. Small enough for ``TINY_CONFIGS``' vocabularies."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(CHAT_SPECIALS + tuple(CHAT_CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(CHAT_SPECIALS))
    backend.decoder = decoders.Fuse()  # characters back to text, without spaces between them
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
