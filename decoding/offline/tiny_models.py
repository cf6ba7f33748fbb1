"""Tiny Llama models built from a config: the test suite's models, and the
fallback default pair when the shipped demo pair is absent.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on
local text (this interpreter's own standard-library sources), the weights are
random and seeded. Random weights make a poor drafter for an unrelated
verifier, which is exactly what the tests need to exercise rejections.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def stdlib_files(limit: int | None = None) -> list[Path]:
    """This interpreter's standard-library ``.py`` files, sorted (every machine has them)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[:limit] if limit else files


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer, in Hugging Face format, trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` made-up words ("w0", "w1", ...).

    Tiny vocabularies make exact distribution tests feasible: the output
    distribution over all sequences of a few tokens can be enumerated.
    """
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None, unk_token="w0")


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int
    num_layers: int
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    logit_scale: float = 1.0  # >1 sharpens the random model's distributions


TINY_VERIFIER = TinySpec(hidden_size=64, num_layers=3)
TINY_DRAFTER = TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


def llama_config(
    tokenizer: PreTrainedTokenizerFast, spec: TinySpec, *, context: int | None = None, tied: bool = False
) -> LlamaConfig:
    """A Llama config of ``spec``'s shape over ``tokenizer``'s vocabulary (``context``
    defaults to the spec's; ``tied`` shares the embedding and LM-head weights)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=context or spec.max_position_embeddings,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    out: Path, tokenizer: PreTrainedTokenizerFast, spec: TinySpec, seed: int, dtype: torch.dtype = torch.float32
) -> Path:
    """Save a randomly initialised Llama with ``tokenizer`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(tokenizer, spec)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if spec.logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(spec.logit_scale)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_pair(out: Path, seed: int = 0, vocab_size: int = 512) -> tuple[Path, Path]:
    """Build a tiny (verifier, drafter) pair sharing one BPE tokenizer into ``out``."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(limit=40)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    verifier = build_model(out / "verifier", tokenizer, TINY_VERIFIER, seed=seed)
    drafter = build_model(out / "drafter", tokenizer, TINY_DRAFTER, seed=seed + 1)
    return verifier, drafter
