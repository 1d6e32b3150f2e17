"""Tiny offline models and tokenizers for pipeline tests (no hub on these machines)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification, PreTrainedTokenizerFast


# A minimal ChatML template, so chat-based families (lm_judge) run on the tiny tokenizer.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts, *, vocab_size: int = 400, special_tokens=("<s>", "</s>", "<pad>")) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on ``texts`` (deterministic for the same texts)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = CHATML
    return wrapped


def tiny_llama(vocab_size: int, *, head: str = "causal", seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random Llama with a causal-LM head or a 2-label token-classification head, fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, num_labels=2,
    )  # fmt: skip
    cls = LlamaForCausalLM if head == "causal" else LlamaForTokenClassification
    return cls(config).eval()
