"""Build the decoding core (drafter, verifier, router) that the settings describe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from decoding.causal_lm import CausalLM, check_same_vocabulary, load_tokenizer
from decoding.default_models import default_pair
from decoding.drafters import Drafter, HFDrafter, NgramDrafter
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier, Verifier
from service.config import DecodingSettings, TandemSettings

if TYPE_CHECKING:
    from decoding.backends.split_edge import SplitVerifier


@dataclass
class Backends:
    router: SpeculativeRouter
    verifier: Verifier
    drafter: Drafter | None
    tokenizer: PreTrainedTokenizerBase
    #: The same decoding core over the split verifier (edge head/tail + datacenter body),
    #: for private requests; None unless ``split_worker_url`` is configured.
    split_router: SpeculativeRouter | None = None

    async def aclose(self) -> None:
        await self.verifier.aclose()
        if self.split_router is not None:
            await self.split_router.verifier.aclose()
        if self.drafter is not None and self.drafter is not self.verifier:
            await self.drafter.aclose()


def spec_options(decoding: DecodingSettings) -> SpecOptions:
    """The server-wide decoding defaults (a TandemSettings, or its DecodingSettings alone)."""
    return SpecOptions(
        mode=decoding.mode,
        num_draft_tokens=decoding.num_draft_tokens,
        min_draft_tokens=decoding.min_draft_tokens,
        max_draft_tokens=decoding.max_draft_tokens,
        adaptive=decoding.adaptive_draft,
    )


def build_backends(settings: TandemSettings) -> Backends:
    """Load the models and wire the router; raises ModelLoadError with a clear message."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)  # process-wide: the models are this process's work
    verifier_path, drafter_path = settings.verifier, settings.drafter
    if verifier_path is None or drafter_path is None:
        default_verifier, default_drafter = default_pair()
        verifier_path = verifier_path or str(default_verifier)
        drafter_path = drafter_path or str(default_drafter)
    dtype = getattr(torch, settings.dtype)

    verifier: Verifier
    if settings.remote_verifier:
        from decoding.backends.vllm_client import VLLMVerifier, fetch_tokenizer  # the remote backend is optional
        from decoding.causal_lm import read_config

        api_key = settings.verifier_api_key
        # Several replicas of one verifier: "http://a:8001,http://b:8001" (sessions stick to one, move on its loss).
        urls = [u.strip() for u in settings.verifier.split(",") if u.strip()]
        if settings.tokenizer or drafter_path != "ngram":
            tokenizer = load_tokenizer(settings.tokenizer or drafter_path)
        else:  # a model-free drafter and a remote model: the only tokenizer is the verifier's
            tokenizer = fetch_tokenizer(urls[0], api_key.get_secret_value() if api_key else None)
        replicas = [
            VLLMVerifier(
                url,
                tokenizer,
                api=settings.verifier_api,
                top_logprobs=settings.verifier_top_logprobs,
                timeout_s=settings.verifier_timeout_s,
                retries=settings.verifier_retries,
                backoff_s=settings.verifier_backoff_s,
                api_key=api_key.get_secret_value() if api_key else None,
                vocab_size=read_config(drafter_path)["vocab_size"] if drafter_path != "ngram" else None,
            )
            for url in urls
        ]
        if len(replicas) == 1:
            verifier = replicas[0].connect_at_start()
        else:
            from decoding.backends.vllm_replicas import ReplicatedVerifier

            verifier = ReplicatedVerifier(replicas).connect_at_start()
        verifier_lm = None
    else:
        verifier_lm = CausalLM(verifier_path, dtype=dtype, device=settings.device)
        verifier = HFVerifier(verifier_lm, max_batch=settings.max_batch)
        tokenizer = load_tokenizer(settings.tokenizer or verifier_path)

    drafter: Drafter | None
    if drafter_path == "ngram":
        drafter = NgramDrafter(verifier.vocab_size)
    else:
        check_same_vocabulary(load_tokenizer(drafter_path), tokenizer, drafter_path, str(verifier_path))
        drafter_lm = CausalLM(drafter_path, dtype=dtype, device=settings.device)
        if verifier_lm is not None and drafter_lm.vocab_size != verifier_lm.vocab_size:
            from decoding.causal_lm import ModelLoadError

            raise ModelLoadError(
                f"drafter {drafter_path!r} has {drafter_lm.vocab_size} output logits but the verifier has "
                f"{verifier_lm.vocab_size}; they must share one vocabulary"
            )
        ratio = settings.draft_cost_ratio
        if ratio is None:
            ratio = drafter_lm.num_parameters / verifier_lm.num_parameters if verifier_lm else 0.1
        drafter = HFDrafter(drafter_lm, cost_ratio=ratio, max_batch=settings.max_batch)

    router = SpeculativeRouter(
        verifier, drafter, tokenizer, spec_options(settings), settings.kernel_backend, settings.verifier_fallback
    )
    split_router = None
    if settings.split_worker_url:
        split_verifier = build_split_verifier(settings, tokenizer)
        # A split verification is a network round trip, so the drafter's cost relative to it is
        # measured, not the parameter ratio: adaptive k then grows with the RTT.
        split_router = SpeculativeRouter(
            split_verifier, drafter, tokenizer, spec_options(settings), settings.kernel_backend, measure_cost=True
        )
    return Backends(router=router, verifier=verifier, drafter=drafter, tokenizer=tokenizer, split_router=split_router)


def build_split_verifier(settings: TandemSettings, tokenizer: PreTrainedTokenizerBase | None = None) -> SplitVerifier:
    """The edge of split inference that the ``split_*`` settings describe (docs/split-inference.md).

    The edge model is ``split_model``, else the local ``verifier`` directory, else the
    default pair's verifier. ``tokenizer`` (optional) is checked to fit its vocabulary.
    """
    from decoding.backends.split_edge import SplitVerifier  # loaded only where split inference is configured
    from decoding.partition import SplitConfigError

    if not settings.split_worker_url:
        raise SplitConfigError("split inference needs split_worker_url (TANDEM_SPLIT_WORKER_URL): the worker's http(s)://host:port")
    path = settings.split_model
    if path is None and settings.verifier and not settings.remote_verifier:
        path = settings.verifier
    if path is None:
        path = str(default_pair()[0])
    dtype = getattr(torch, settings.dtype)
    verifier = SplitVerifier.from_pretrained(
        path,
        settings.split_worker_url,
        settings.split_layers,
        dtype=dtype,
        device=settings.device,
        token=settings.split_token.get_secret_value() if settings.split_token else None,
        noise_scale=settings.split_noise_scale,
        wire_dtype=dtype if settings.split_wire_dtype == "auto" else getattr(torch, settings.split_wire_dtype),
        timeout_s=settings.split_timeout_s,
        reconnect_s=settings.split_reconnect_s,
    )
    if tokenizer is not None and len(tokenizer) > verifier.vocab_size:
        raise SplitConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the split model {path!r} has {verifier.vocab_size} logits"
        )
    return verifier
