"""A tiny model pair that vLLM's CPU backend can serve, built locally (nothing downloaded), and prompt text for it.

Used by the vLLM benchmarks (``loadtests.bench_vllm``, ``loadtests.bench_split``) and by the tests' vLLM server
(tests/support/vllm.py).
"""

from __future__ import annotations

from pathlib import Path


def build_pair(out: Path, seed: int = 0, max_positions: int = 2048, drafter_noise: float = 0.1,
               deep_scale: float = 0.1) -> tuple[Path, Path]:
    """(verifier_dir, drafter_dir): tiny Llamas that vLLM's CPU backend can serve.

    vLLM's CPU attention needs head_dim >= 32 (``decoding.offline.tiny_models``'
    default pair has 16), so the verifier is 4 layers of width 128 with 4
    heads. The drafter is the verifier's first layer (same embeddings, norm
    and head) with noise on its output head: it agrees with the verifier
    often but not always (60-80% greedy agreement), so rounds see both
    acceptances and rejections. Logits are sharpened (logit_scale 20) so that
    greedy choices are not near-ties and the top-20 carries most of the mass.
    """
    import torch
    from transformers import LlamaForCausalLM

    from decoding.offline.tiny_models import TinySpec, build_model, stdlib_files, train_bpe_tokenizer

    out = Path(out)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(limit=40)]
    tokenizer = train_bpe_tokenizer(texts, 512)
    spec = TinySpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, max_position_embeddings=max_positions,
                    logit_scale=20.0)
    verifier_dir = build_model(out / "verifier", tokenizer, spec, seed=seed)
    full = LlamaForCausalLM.from_pretrained(verifier_dir)
    with torch.no_grad():  # layers 1.. write less into the residual stream: the first layer alone approximates the model
        for layer in full.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(deep_scale)
            layer.mlp.down_proj.weight.mul_(deep_scale)
    full.save_pretrained(verifier_dir)
    config = full.config
    config.num_hidden_layers = 1
    drafter = LlamaForCausalLM(config)
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    drafter.load_state_dict(state, strict=True)
    with torch.no_grad():
        w = drafter.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1)) * w.std() * drafter_noise)
    drafter_dir = out / "drafter"
    drafter.save_pretrained(drafter_dir)
    tokenizer.save_pretrained(drafter_dir)
    return verifier_dir, drafter_dir


def sample_text() -> str:
    """Deterministic local text for prompts (standard-library sources)."""
    from decoding.offline.tiny_models import stdlib_files

    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[40:80])
