"""A small random-init causal LM with a locally trained tokenizer.

Tests and the demo need a base model without touching a model hub. This writes a standard
Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that transformers, PEFT and the onnxruntime-genai model builder all
load. The same seed gives byte-identical weights and tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3")

# Sized so LoRA adapters learn the demo tasks in well under a minute each on 2 CPU cores.
DEFAULT_SHAPE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VOCAB_SIZE = 2048
# A random output head at the usual init (std 0.02) caps logits near +-3 over 2048 tokens, so no
# LoRA on the projections can make any token likely (eval loss stays ~4 even at 100% exact match)
# and greedy choices sit on near-ties. Scaling the head gives the logit range of a trained model.
OUTPUT_HEAD_SCALE = 8.0
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def _corpus(extra: Iterable[str]) -> Iterator[str]:
    """Text the tokenizer learns merges from: the demo datasets (so task words are single
    tokens) plus printable ASCII so that any text round-trips."""
    from loraplex.trainer import demo_tasks

    yield from demo_tasks.corpus()
    yield "".join(chr(c) for c in range(32, 127))
    yield from extra


def train_tokenizer(extra_text: Iterable[str] = (), vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (GPT-2 style): lossless for any UTF-8 text, loadable by onnxruntime-genai."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_text), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def model_config(architecture: str, vocab_size: int, eos_id: int, pad_id: int, **shape):
    """A transformers config for one of ARCHITECTURES with the tiny default shape."""
    import transformers

    dims = {**DEFAULT_SHAPE, **shape}
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        **dims,
    )
    if architecture == "llama":
        return transformers.LlamaConfig(**common)
    if architecture == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if architecture == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **common)
    if architecture == "phi3":
        return transformers.Phi3Config(original_max_position_embeddings=dims["max_position_embeddings"], **common)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_tiny_base(out: str | Path, *, seed: int = 0, architecture: str = "llama", **shape) -> Path:
    """Write a random-init model of `architecture` and its tokenizer to `out`; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(out)
    config = model_config(
        architecture,
        vocab_size=len(tokenizer),
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(OUTPUT_HEAD_SCALE)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    (out / "loraplex_tiny_base.json").write_text(
        json.dumps({"architecture": architecture, "seed": seed, "shape": {**DEFAULT_SHAPE, **shape}}, indent=2)
    )
    return out
