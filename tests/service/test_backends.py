"""service/backends.py: what build_backends wires from the settings (real tiny models, no server)."""

from __future__ import annotations

import asyncio

import torch

from decoding.backends.split_edge import SplitVerifier
from service.backends import build_backends
from service.config import TandemSettings


def test_torch_threads_setting_applies_to_the_process(tiny_verifier_dir, tiny_drafter_dir):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pair = dict(verifier=str(tiny_verifier_dir), drafter=str(tiny_drafter_dir))
        asyncio.run(build_backends(TandemSettings.load(**pair, torch_threads=1)).aclose())
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        asyncio.run(build_backends(TandemSettings.load(**pair)).aclose())
        assert torch.get_num_threads() == 2  # unset: torch's own setting is left alone
    finally:
        torch.set_num_threads(before)


def test_split_router_times_the_drafter_against_split_rounds(tiny_verifier_dir, tiny_drafter_dir):
    settings = TandemSettings.load(verifier=str(tiny_verifier_dir), drafter=str(tiny_drafter_dir),
                                   split_worker_url="http://127.0.0.1:9", split_layers="1:2")  # fmt: skip
    backends = build_backends(settings)
    try:
        split = backends.split_router
        assert split is not None and isinstance(split.verifier, SplitVerifier)
        assert split.drafter is backends.drafter and split.cost.measured and not backends.router.cost.measured
        # Until both are measured, the drafter's own cost ratio is reported.
        assert split.cost.ratio == backends.drafter.cost_ratio
    finally:
        asyncio.run(backends.aclose())
