"""Build the demo drafter/verifier pair from scratch: ``tandem models build-demo``.

The recipe, end to end (deterministic given ``seed`` and the thread count):

1. Corpus: this interpreter's standard-library sources (``Lib/*.py``, via
   :func:`decoding.offline.tiny_models.stdlib_files`), split *by file* with a seeded
   shuffle into train and held-out files. Held-out files are never trained on
   (not even by the tokenizer).
2. Tokenizer: a byte-level BPE (:func:`decoding.offline.tiny_models.train_bpe_tokenizer`)
   trained on the train files, shared by all models.
3. Verifier: a Llama pretrained with next-token cross-entropy on random
   windows of the train token stream.
4. Drafters: a 1-layer Llama, trained twice from the same initialisation for the
   same steps on the same number of windows: once with cross-entropy on the data
   alone, once distilled from the verifier with KL(p_verifier || q_drafter) on
   the verifier's top-k soft targets, over train text and on-policy text (train
   prompts continued by the verifier, greedy and sampled).
5. Evaluation: held-out greedy acceptance with the real SpeculativeRouter
   (fixed k), and the batch-1 KV-cached forward cost of both models.
6. Weights saved as fp16 safetensors, each with a model card.

Step counts are explicit (``--budget-minutes`` only scales them through fixed
nominal rates, never through a clock), so a rebuild with the same seed gives
the same weights on the same software and thread count.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from decoding.offline.tiny_models import TinySpec, llama_config, stdlib_files, train_bpe_tokenizer


@dataclass(frozen=True)
class DemoRecipe:
    """Every knob of the build. The defaults are the committed demo pair."""

    vocab_size: int = 4096
    heldout_fraction: float = 0.1
    max_files: int | None = None  # use only the first N stdlib files (tests)
    context: int = 1024  # max_position_embeddings
    seq_len: int = 256  # training window
    verifier: TinySpec = TinySpec(hidden_size=128, num_layers=12, num_heads=4, num_kv_heads=2, intermediate_size=512)
    drafter: TinySpec = TinySpec(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=384)
    verifier_steps: int = 450
    verifier_batch: int = 8
    verifier_lr: float = 3e-3
    distill_batches: int = 40  # data windows cached with the verifier's soft targets
    #: batches of on-policy text: train-split prompts continued by the verifier itself
    #: (alternately greedy and sampled at onpolicy_temperature), also with its soft targets
    onpolicy_batches: int = 24
    onpolicy_prompt_tokens: int = 64
    onpolicy_temperature: float = 0.8
    distill_batch: int = 8
    drafter_epochs: int = 5  # passes over the cached windows (same for both drafters)
    drafter_lr: float = 3e-3
    top_k: int = 32  # soft-target support kept per position
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_prompts: int = 12
    eval_prompt_tokens: int = 96
    eval_new_tokens: int = 64
    eval_draft_tokens: int = 4
    cost_passes: int = 100
    #: 1 thread: on a shared, oversubscribed 2-core machine, 2 OpenMP threads
    #: wait on each other at every op and were measured 2-3x slower.
    threads: int = 1

    @property
    def drafter_batches(self) -> int:
        """Batches per drafter epoch, the same for both drafters."""
        return self.distill_batches + self.onpolicy_batches

    @property
    def drafter_steps(self) -> int:
        return self.drafter_batches * self.drafter_epochs


#: Nominal rates (on the 2-core reference machine) used by ``--budget-minutes``:
#: verifier training steps per minute, and cached distillation batches per minute.
NOMINAL_VERIFIER_STEPS_PER_MIN = 8.0
NOMINAL_DISTILL_BATCHES_PER_MIN = 12.0


def recipe_for_budget(minutes: float, base: DemoRecipe = DemoRecipe()) -> DemoRecipe:
    """Scale step counts to roughly ``minutes`` of training, deterministically
    (from fixed nominal rates, never from a clock). ~70% goes to the verifier."""
    v_steps = max(4, int(0.7 * minutes * NOMINAL_VERIFIER_STEPS_PER_MIN))
    batches = max(2, int(0.15 * minutes * NOMINAL_DISTILL_BATCHES_PER_MIN))
    return replace(base, verifier_steps=v_steps, distill_batches=batches, warmup_steps=min(base.warmup_steps, v_steps // 4))


# -- corpus ---------------------------------------------------------------------


@dataclass
class Corpus:
    train_files: list[Path]
    heldout_files: list[Path]

    @property
    def root(self) -> Path:
        return (self.train_files + self.heldout_files)[0].parent


def split_corpus(seed: int, heldout_fraction: float = 0.1, max_files: int | None = None) -> Corpus:
    """Split the stdlib files by file with a seeded shuffle (sorted lists out)."""
    files = stdlib_files(limit=max_files)
    order = list(files)
    random.Random(seed).shuffle(order)
    n_held = max(1, round(heldout_fraction * len(order)))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return Corpus(train_files=train, heldout_files=held)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def token_stream(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> torch.Tensor:
    """All files' tokens, each followed by the end-of-text token, as one 1-D tensor."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for f in files:
        ids.extend(tokenizer.encode(read_text(f), add_special_tokens=False))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[n, length] random windows of ``stream``."""
    starts = torch.randint(0, len(stream) - length, (n,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def heldout_prompts(
    tokenizer: PreTrainedTokenizerFast,
    heldout_files: list[Path],
    n: int,
    prompt_tokens: int,
    min_continuation: int = 0,
    seed: int = 0,
) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_tokens`` tokens, each starting at a line
    start of a held-out file (round-robin over files, seeded positions)."""
    return text_prompts(tokenizer, [read_text(f) for f in heldout_files], n, prompt_tokens, min_continuation, seed)


def text_prompts(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], n: int, prompt_tokens: int, min_continuation: int = 0, seed: int = 0
) -> list[list[int]]:
    """:func:`heldout_prompts` over documents given as text."""
    rng = random.Random(seed)
    per_file = []
    for text in texts:
        line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        per_file.append((text, line_starts))
    prompts: list[list[int]] = []
    attempts = 0
    while len(prompts) < n and attempts < 50 * n:
        text, starts = per_file[attempts % len(per_file)]
        attempts += 1
        pos = starts[rng.randrange(len(starts))]
        ids = tokenizer.encode(text[pos : pos + 8 * (prompt_tokens + min_continuation) + 64], add_special_tokens=False)
        if len(ids) >= prompt_tokens + min_continuation:
            prompts.append(ids[:prompt_tokens])
    if len(prompts) < n:
        raise ValueError(f"held-out text yields only {len(prompts)} prompts of {prompt_tokens} tokens (asked for {n})")
    return prompts


# -- models ---------------------------------------------------------------------


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=False)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at learning rate ``lr``, gradients clipped to norm 1."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train_verifier(
    model: LlamaForCausalLM, stream: torch.Tensor, recipe: DemoRecipe, seed: int, progress: bool = True
) -> list[float]:
    """Next-token pretraining on random windows. Returns the per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, recipe.verifier_lr, recipe.weight_decay)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(recipe.verifier_steps), desc="verifier pretraining", disable=not progress, file=sys.stderr)
    for step in bar:
        batch = sample_windows(stream, recipe.verifier_batch, recipe.seq_len + 1, gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer_step(model, opt, loss, lr_at(step, recipe.verifier_steps, recipe.verifier_lr, recipe.warmup_steps))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-10:]):.3f}")
    model.eval()
    return losses


@dataclass
class SoftTargets:
    """Cached training windows with the verifier's top-k next-token distributions."""

    inputs: torch.Tensor  # [N, B, T] token ids
    labels: torch.Tensor  # [N, B, T] next tokens
    top_ids: torch.Tensor  # [N, B, T, K] int32
    top_probs: torch.Tensor  # [N, B, T, K] float16, renormalised over the K kept


@torch.no_grad()  # not inference_mode: the cached tensors feed autograd later
def soft_targets(
    teacher: LlamaForCausalLM, batches: list[torch.Tensor], top_k: int, progress: bool = True, desc: str = "soft targets"
) -> SoftTargets:
    """The teacher's top-k next-token distributions on ``batches`` ([B, T+1] each)."""
    teacher.eval()
    inputs, labels, ids, probs = [], [], [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, file=sys.stderr):
        logits = teacher(input_ids=batch[:, :-1]).logits.float()
        p = torch.softmax(logits, dim=-1)
        top = torch.topk(p, top_k, dim=-1)
        inputs.append(batch[:, :-1])
        labels.append(batch[:, 1:])
        ids.append(top.indices.to(torch.int32))
        probs.append((top.values / top.values.sum(-1, keepdim=True)).half())
    return SoftTargets(torch.stack(inputs), torch.stack(labels), torch.stack(ids), torch.stack(probs))


def concat_targets(a: SoftTargets, b: SoftTargets) -> SoftTargets:
    return SoftTargets(*(torch.cat([x, y]) for x, y in zip(asdict_targets(a), asdict_targets(b))))


def asdict_targets(t: SoftTargets) -> tuple[torch.Tensor, ...]:
    return (t.inputs, t.labels, t.top_ids, t.top_probs)


def data_windows(stream: torch.Tensor, recipe: DemoRecipe, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [sample_windows(stream, recipe.distill_batch, recipe.seq_len + 1, gen) for _ in range(n)]


@torch.no_grad()
def onpolicy_windows(
    teacher: LlamaForCausalLM, stream: torch.Tensor, recipe: DemoRecipe, seed: int, progress: bool = True
) -> list[torch.Tensor]:
    """Train-split prompts continued by the verifier itself: what a drafter sees at
    serving time. Even batches greedy, odd batches sampled at onpolicy_temperature."""
    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    eos, pad = teacher.generation_config.eos_token_id, teacher.generation_config.pad_token_id
    teacher.generation_config.eos_token_id = None  # fixed-length continuations
    teacher.generation_config.pad_token_id = teacher.config.pad_token_id
    out = []
    try:
        P = recipe.onpolicy_prompt_tokens
        for b in tqdm(range(recipe.onpolicy_batches), desc="verifier on-policy samples", disable=not progress, file=sys.stderr):
            prompts = sample_windows(stream, recipe.distill_batch, P, gen)
            sampled = b % 2 == 1
            kw = {"do_sample": True, "temperature": recipe.onpolicy_temperature, "top_k": 0, "top_p": 1.0} if sampled else {"do_sample": False}
            torch.manual_seed(seed + 1 + b)
            seqs = teacher.generate(prompts, max_new_tokens=recipe.seq_len + 1 - P, min_new_tokens=recipe.seq_len + 1 - P, **kw)
            out.append(seqs[:, : recipe.seq_len + 1].contiguous())
    finally:
        teacher.generation_config.eos_token_id, teacher.generation_config.pad_token_id = eos, pad
    return out


def distill_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q): p the teacher's top-k distribution
    (renormalised), q the student's full softmax evaluated on p's support."""
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, top_ids.long())
    p = top_probs.float()
    kl = (p * (torch.log(p.clamp_min(1e-12)) - logq)).sum(-1)
    return kl.mean()


def train_drafter(
    model: LlamaForCausalLM,
    targets: SoftTargets,
    recipe: DemoRecipe,
    seed: int,
    distill: bool,
    progress: bool = True,
) -> dict:
    """Train on the cached windows, ``drafter_epochs`` passes in a seeded order.

    distill=False: cross-entropy on the data; distill=True: KL to the verifier.
    Both report the CE on the data and the KL to the verifier per step.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, recipe.drafter_lr, recipe.weight_decay)
    n = targets.inputs.shape[0]
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(recipe.drafter_epochs)]).tolist()
    total = len(order)
    model.train()
    kls: list[float] = []
    ces: list[float] = []
    label = "drafter distillation (KL)" if distill else "drafter data-only (CE)"
    bar = tqdm(order, desc=label, disable=not progress, file=sys.stderr)
    for step, i in enumerate(bar):
        logits = model(input_ids=targets.inputs[i]).logits
        kl = distill_kl(logits, targets.top_ids[i], targets.top_probs[i])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.labels[i].reshape(-1))
        optimizer_step(model, opt, kl if distill else ce, lr_at(step, total, recipe.drafter_lr, min(recipe.warmup_steps, total // 4 or 1)))
        kls.append(kl.item())
        ces.append(ce.item())
        bar.set_postfix(kl=f"{statistics.fmean(kls[-10:]):.3f}", ce=f"{statistics.fmean(ces[-10:]):.3f}")
    model.eval()
    return {"kl": kls, "ce": ces}


@torch.inference_mode()
def heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, max_windows: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over consecutive held-out windows."""
    losses = []
    for w in range(min(max_windows, (len(stream) - 1) // seq_len)):
        chunk = stream[w * seq_len : w * seq_len + seq_len + 1][None]
        logits = model(input_ids=chunk[:, :-1]).logits
        losses.append(F.cross_entropy(logits[0], chunk[0, 1:]).item())
    return statistics.fmean(losses)


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """fp16 safetensors + the shared tokenizer, Hugging Face layout."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    return out


def weights_digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


# -- evaluation -----------------------------------------------------------------


def acceptance_eval(
    verifier_dir: Path,
    drafter_dir: Path,
    prompts: list[list[int]],
    new_tokens: int,
    k: int,
    cost_ratio: float = 0.1,
    reference: list[list[int]] | None = None,
    ignore_eos: bool = True,
) -> dict:
    """Greedy speculative decoding with the real router (fixed k) on ``prompts``.

    Also checks the output against verifier-only decoding with the same router
    (``reference``: those outputs, when already computed; returned as "reference").
    ``ignore_eos=False`` stops each answer at the end-of-text token (chat answers).
    """
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.verifiers import HFVerifier

    verifier = HFVerifier(CausalLM(verifier_dir))
    drafter = HFDrafter(CausalLM(drafter_dir), cost_ratio=cost_ratio)
    spec = SpecOptions(mode="speculative", num_draft_tokens=k, min_draft_tokens=k, max_draft_tokens=k, adaptive=False)
    router = SpeculativeRouter(verifier, drafter, load_tokenizer(verifier_dir), spec, kernel_backend="torch")
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=ignore_eos)

    async def run() -> dict:
        drafted = accepted = rounds = 0
        per_pos_d = [0] * k
        per_pos_a = [0] * k
        identical = 0
        refs = []
        try:
            for i, ids in enumerate(prompts):
                gen = await router.generate(ids, params)
                if reference is None:
                    ref = (await router.generate(ids, params, SpecOptions(mode="verifier-only"))).token_ids
                else:
                    ref = reference[i]
                refs.append(ref)
                identical += gen.token_ids == ref
                s = gen.stats
                drafted += s.draft_tokens
                accepted += s.accepted_tokens
                rounds += s.rounds
                for i, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position)):
                    per_pos_d[i] += d
                    per_pos_a[i] += a
        finally:
            await verifier.aclose()
            await drafter.aclose()
        return {
            "k": k,
            "prompts": len(prompts),
            "new_tokens": new_tokens,
            "rounds": rounds,
            "generated_tokens": sum(len(r) for r in refs),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_per_round": accepted / rounds if rounds else 0.0,
            "acceptance_per_position": [a / d if d else None for a, d in zip(per_pos_a, per_pos_d)],
            "identical_to_verifier_only": f"{identical}/{len(prompts)}",
            "reference": refs,
        }

    return asyncio.run(run())


@torch.inference_mode()
def forward_cost(verifier_dir: Path, drafter_dir: Path, context: int = 128, passes: int = 200) -> dict:
    """Batch-1, KV-cached, one-token forward pass time of each model (median ms),
    interleaved so both see the same machine load. A drafter with a reduced head
    (head_vocabulary.json) is timed with it, as tandem runs it."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from decoding.causal_lm import restrict_head

    models = {
        name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True).eval()
        for name, d in (("verifier", verifier_dir), ("drafter", drafter_dir))
    }
    for name, d in (("verifier", verifier_dir), ("drafter", drafter_dir)):
        restrict_head(models[name], Path(d))
    gen = torch.Generator().manual_seed(0)
    vocab = models["verifier"].config.vocab_size
    times: dict[str, list[float]] = {n: [] for n in models}
    caches = {}
    for name, m in models.items():
        caches[name] = DynamicCache(config=m.config)
        m(input_ids=torch.randint(0, vocab, (1, context), generator=gen), cache=caches[name], use_cache=True, logits_to_keep=1)
    for i in range(passes):
        tok = torch.randint(0, vocab, (1, 1), generator=gen)
        for name, m in models.items():
            extra = caches[name].get_seq_length() - context
            if i % 50 == 0 and extra > 0:  # keep the context length around `context`
                caches[name].crop(-extra)
            t0 = time.perf_counter()
            m(input_ids=tok, cache=caches[name], use_cache=True, logits_to_keep=1)
            times[name].append(time.perf_counter() - t0)
    v = statistics.median(times["verifier"]) * 1e3
    d = statistics.median(times["drafter"]) * 1e3
    return {"context": context, "passes": passes, "verifier_ms": v, "drafter_ms": d, "ratio": v / d}


# -- the build ------------------------------------------------------------------


@dataclass
class BuildResult:
    out: Path
    seed: int
    recipe: dict
    command: str
    corpus: dict
    tokenizer: dict
    verifier: dict = field(default_factory=dict)
    drafter: dict = field(default_factory=dict)
    drafter_data_only: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def build_demo(
    out: Path,
    seed: int = 0,
    recipe: DemoRecipe = DemoRecipe(),
    progress: bool = True,
    evaluate: bool = True,
    command: str | None = None,
    reuse_verifier: bool = False,
) -> BuildResult:
    """Build the verifier, the data-only drafter and the distilled drafter into ``out``.

    Writes ``out/verifier``, ``out/drafter`` (distilled, the default) and
    ``out/drafter-data-only``, each with a README.md model card, and
    ``out/verifier/build.json`` with every figure.
    """
    out = Path(out)
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    command = command or "tandem models build-demo --out " + shlex.quote(str(out)) + f" --seed {seed}"
    timings: dict[str, float] = {}
    t = time.perf_counter()

    corpus = split_corpus(seed, recipe.heldout_fraction, recipe.max_files)
    train_texts = [read_text(f) for f in corpus.train_files]
    tokenizer = train_bpe_tokenizer(train_texts, recipe.vocab_size)
    train_stream = token_stream(tokenizer, corpus.train_files)
    held_stream = token_stream(tokenizer, corpus.heldout_files)
    timings["tokenizer"] = time.perf_counter() - t
    result = BuildResult(
        out=out,
        seed=seed,
        recipe=asdict(recipe),
        command=command,
        corpus={
            "source": f"Python {sys.version.split()[0]} standard library, {corpus.root}/*.py",
            "train_files": len(corpus.train_files),
            "heldout_files": [f.name for f in corpus.heldout_files],
            "train_tokens": len(train_stream),
            "heldout_tokens": len(held_stream),
            "train_bytes": sum(f.stat().st_size for f in corpus.train_files),
        },
        tokenizer={"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer)},
    )

    # Verifier. The drafters learn from the saved fp16 weights (save_model rounds the
    # in-memory model to them), so reusing a saved verifier gives the same drafters.
    t = time.perf_counter()
    # Tied embeddings: half the embedding bytes, which dominate a model this small.
    v_config = llama_config(tokenizer, recipe.verifier, context=recipe.context, tied=True)
    reused = reuse_verifier and _reusable_verifier(out / "verifier", seed, recipe)
    if reused:
        from transformers import AutoModelForCausalLM

        verifier = AutoModelForCausalLM.from_pretrained(out / "verifier", dtype=torch.float32, local_files_only=True)
        result.verifier = json.loads((out / "verifier" / "build.json").read_text())["verifier"]
        timings["verifier_training"] = json.loads((out / "verifier" / "build.json").read_text())["timings_s"].get(
            "verifier_training", 0.0
        )
    else:
        verifier = init_model(v_config, seed)
        v_losses = train_verifier(verifier, train_stream, recipe, seed + 1, progress)
        timings["verifier_training"] = time.perf_counter() - t
        result.verifier = {
            "parameters": sum(p.numel() for p in verifier.parameters()),
            "steps": recipe.verifier_steps,
            "tokens_seen": recipe.verifier_steps * recipe.verifier_batch * recipe.seq_len,
            "final_train_loss": statistics.fmean(v_losses[-10:]),
            "heldout_loss": heldout_loss(verifier, held_stream, recipe.seq_len),
            "loss_curve": v_losses[:: max(1, len(v_losses) // 50)],
        }
        save_model(verifier, tokenizer, out / "verifier")
    verifier.eval()

    # Drafters: same init, same number of windows and steps, CE vs KL. The data-only
    # drafter sees distill_batches + onpolicy_batches data windows; the distilled one the
    # first distill_batches of them plus onpolicy_batches of the verifier's own text.
    t = time.perf_counter()
    windows = data_windows(train_stream, recipe, recipe.drafter_batches, seed + 2)
    data_targets = soft_targets(verifier, windows, recipe.top_k, progress, "verifier soft targets (data)")
    if recipe.onpolicy_batches:
        policy = onpolicy_windows(verifier, train_stream, recipe, seed + 5, progress)
        policy_targets = soft_targets(verifier, policy, recipe.top_k, progress, "verifier soft targets (on-policy)")
        head = SoftTargets(*(x[: recipe.distill_batches] for x in asdict_targets(data_targets)))
        distill_targets = concat_targets(head, policy_targets)
    else:
        distill_targets = data_targets
    timings["soft_targets"] = time.perf_counter() - t
    del verifier
    d_config = llama_config(tokenizer, recipe.drafter, context=recipe.context, tied=True)
    for key, distill, dirname in (("drafter_data_only", False, "drafter-data-only"), ("drafter", True, "drafter")):
        t = time.perf_counter()
        model = init_model(d_config, seed + 3)
        curves = train_drafter(model, distill_targets if distill else data_targets, recipe, seed + 4, distill, progress)
        timings[key] = time.perf_counter() - t
        setattr(
            result,
            key,
            {
                "objective": (
                    "KL(p_verifier || q_drafter), top-k soft targets, on data and on-policy verifier text"
                    if distill
                    else "cross-entropy on the data"
                ),
                "parameters": sum(p.numel() for p in model.parameters()),
                "steps": recipe.drafter_steps,
                "tokens_seen": recipe.drafter_steps * recipe.distill_batch * recipe.seq_len,
                "final_train_kl_to_verifier": statistics.fmean(curves["kl"][-10:]),
                "final_train_ce": statistics.fmean(curves["ce"][-10:]),
                "initial_train_kl_to_verifier": curves["kl"][0],
                "heldout_loss": heldout_loss(model, held_stream, recipe.seq_len),
            },
        )
        save_model(model, tokenizer, out / dirname)
    del data_targets, distill_targets

    if evaluate:
        t = time.perf_counter()
        prompts = heldout_prompts(
            tokenizer, corpus.heldout_files, recipe.eval_prompts, recipe.eval_prompt_tokens, recipe.eval_new_tokens, seed
        )
        result.cost = forward_cost(out / "verifier", out / "drafter", passes=recipe.cost_passes)
        ratio = 1.0 / result.cost["ratio"]
        reference = None
        for key, dirname in (("drafter", "drafter"), ("drafter_data_only", "drafter-data-only")):
            acc = acceptance_eval(
                out / "verifier", out / dirname, prompts, recipe.eval_new_tokens, recipe.eval_draft_tokens, ratio, reference
            )
            reference = acc.pop("reference")
            getattr(result, key)["heldout_acceptance"] = acc
        timings["evaluation"] = time.perf_counter() - t
    result.timings_s = timings
    (out / "verifier" / "build.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    write_model_cards(result)
    return result


def _reusable_verifier(path: Path, seed: int, recipe: DemoRecipe) -> bool:
    """A verifier saved by a build with the same seed and the same tokenizer/verifier recipe."""
    build = path / "build.json"
    if not build.is_file() or not (path / "model.safetensors").is_file():
        return False
    old = json.loads(build.read_text())
    keys = ("vocab_size", "heldout_fraction", "max_files", "context", "seq_len", "verifier", "verifier_steps",
            "verifier_batch", "verifier_lr", "warmup_steps", "weight_decay", "threads")  # fmt: skip
    mine = json.loads(json.dumps(asdict(recipe)))
    return old.get("seed") == seed and all(old["recipe"].get(k) == mine.get(k) for k in keys)


# -- model cards ----------------------------------------------------------------


def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _size_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 1e6


def write_model_cards(r: BuildResult) -> None:
    rec = r.recipe
    held = ", ".join(r.corpus["heldout_files"])
    common = (
        f"- Corpus: {r.corpus['source']}; split by file with `random.Random({r.seed}).shuffle`; "
        f"{r.corpus['train_files']} train files ({r.corpus['train_tokens']:,} tokens), "
        f"{len(r.corpus['heldout_files'])} held-out files ({r.corpus['heldout_tokens']:,} tokens), never trained on: {held}.\n"
        f"- Tokenizer: {r.tokenizer['type']}, {r.tokenizer['vocab_size']} tokens, trained on the train files only; "
        "shared by the verifier and both drafters.\n"
        f"- Seed: {r.seed}. Command: `{r.command}` (deterministic given the seed, on the same software and "
        f"{rec['threads']} torch threads). Every figure: `models/demo/verifier/build.json`.\n"
    )

    def acc(d: dict) -> str:
        a = d.get("heldout_acceptance")
        if not a:
            return "not evaluated"
        pos = ", ".join(_fmt(x, 2) for x in a["acceptance_per_position"])
        return (
            f"{100 * a['acceptance_rate']:.1f}% (greedy, k={a['k']} fixed, {a['prompts']} held-out prompts of "
            f"{rec['eval_prompt_tokens']} tokens, {a['new_tokens']} new tokens each, real SpeculativeRouter); "
            f"mean accepted per round {_fmt(a['mean_accepted_per_round'], 2)}; per position [{pos}]; "
            f"output identical to verifier-only: {a['identical_to_verifier_only']}"
        )

    v, d, dd, cost = r.verifier, r.drafter, r.drafter_data_only, r.cost
    vs, ds = rec["verifier"], rec["drafter"]
    cost_line = (
        f"batch-1 KV-cached one-token forward (context {cost['context']}, median of {cost['passes']}, fp32, "
        f"{rec['threads']} threads): verifier {cost['verifier_ms']:.2f} ms, drafter {cost['drafter_ms']:.2f} ms, "
        f"ratio {cost['ratio']:.1f}x"
        if cost
        else "not measured"
    )
    arch = "Llama (`LlamaForCausalLM`), tied embeddings, weights fp16 safetensors"
    cards = {
        "verifier": (
            "# tandem demo verifier\n\n"
            "The large side of the demo pair: a small Python-code language model.\n\n"
            f"- Architecture: {arch}; {vs['num_layers']} layers, hidden {vs['hidden_size']}, "
            f"{vs['num_heads']} heads ({vs['num_kv_heads']} KV), MLP {vs['intermediate_size']}, context {rec['context']}; "
            f"{v['parameters']:,} parameters.\n" + common + f"- Training: {v['steps']} steps of {rec['verifier_batch']}x"
            f"{rec['seq_len']} tokens ({v['tokens_seen']:,} tokens), AdamW peak lr {rec['verifier_lr']}, "
            f"cosine to 10%, warmup {rec['warmup_steps']}.\n"
            f"- Final train loss (mean of last 10 steps): {_fmt(v['final_train_loss'])} nats/token; "
            f"held-out loss {_fmt(v['heldout_loss'])} nats/token.\n"
            f"- Cost: {cost_line}.\n"
            f"- Held-out acceptance of its drafters: distilled {acc(d)}.\n  Data-only: {acc(dd)}.\n"
        ),
    }
    for key, dirname, title, info in (
        ("drafter", "drafter", "tandem demo drafter (distilled, the default)", d),
        ("drafter_data_only", "drafter-data-only", "tandem demo drafter, data-only baseline", dd),
    ):
        other = dd if key == "drafter" else d
        other_name = "data-only baseline" if key == "drafter" else "distilled drafter (the default)"
        cards[dirname] = (
            f"# {title}\n\n"
            f"- Architecture: {arch}; {ds['num_layers']} layer, hidden {ds['hidden_size']}, "
            f"{ds['num_heads']} heads ({ds['num_kv_heads']} KV), MLP {ds['intermediate_size']}, context {rec['context']}; "
            f"{info['parameters']:,} parameters.\n" + common + f"- Objective: {info['objective']} (top-{rec['top_k']} of "
            f"the verifier's distribution, renormalised). Both drafters start from the same initialisation (seed "
            f"{r.seed + 3}) and train for the same {info['steps']} steps of {rec['distill_batch']}x{rec['seq_len']} tokens "
            f"({rec['drafter_epochs']} epochs of {rec['distill_batches'] + rec['onpolicy_batches']} cached windows, "
            f"{info['tokens_seen']:,} tokens; AdamW peak lr {rec['drafter_lr']}): the data-only drafter on "
            f"{rec['distill_batches'] + rec['onpolicy_batches']} windows of train-split text, the distilled one on the "
            f"first {rec['distill_batches']} of them plus {rec['onpolicy_batches']} windows of on-policy text "
            f"(train-split prompts of {rec['onpolicy_prompt_tokens']} tokens continued by the verifier, alternately "
            f"greedy and sampled at T={rec['onpolicy_temperature']}).\n"
            f"- Final train KL to the verifier {_fmt(info['final_train_kl_to_verifier'])} (first step "
            f"{_fmt(info['initial_train_kl_to_verifier'])}); final train CE {_fmt(info['final_train_ce'])}; held-out "
            f"CE {_fmt(info['heldout_loss'])} nats/token.\n"
            f"- Cost: {cost_line}.\n"
            f"- Held-out acceptance against the demo verifier: {acc(info)}.\n"
            f"- The {other_name}, for comparison: {acc(other)}.\n"
        )
    for dirname, text in cards.items():
        path = r.out / dirname
        if path.is_dir():
            (path / "README.md").write_text(text)


def main_build_demo(args) -> int:
    """Entry point of ``tandem models build-demo``."""
    recipe = recipe_for_budget(args.budget_minutes) if args.budget_minutes else DemoRecipe()
    overrides = {}
    for name in ("verifier_steps", "distill_batches", "onpolicy_batches", "drafter_epochs", "threads"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    recipe = replace(recipe, **overrides)
    command = None
    if "build-demo" in sys.argv:  # --reuse-verifier gives the same result, so the from-scratch command is recorded
        argv = [a for a in sys.argv[sys.argv.index("build-demo") :] if a != "--reuse-verifier"]
        command = "tandem models " + " ".join(shlex.quote(a) for a in argv)
    result = build_demo(
        Path(args.out),
        seed=args.seed,
        recipe=recipe,
        progress=not args.quiet,
        evaluate=not args.no_eval,
        command=command,
        reuse_verifier=getattr(args, "reuse_verifier", False),
    )
    summary = {
        "out": str(result.out),
        "verifier_params": result.verifier["parameters"],
        "verifier_final_loss": result.verifier["final_train_loss"],
        "cost_ratio": result.cost.get("ratio"),
        "acceptance_data_only": result.drafter_data_only.get("heldout_acceptance", {}).get("acceptance_rate"),
        "acceptance_distilled": result.drafter.get("heldout_acceptance", {}).get("acceptance_rate"),
        "sizes_mb": {d.name: round(_size_mb(d), 2) for d in sorted(result.out.iterdir()) if d.is_dir()},
        "timings_s": {k: round(v, 1) for k, v in result.timings_s.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0
