"""Split inference: the prompt never leaves the edge (see docs/split-inference.md).

* :mod:`decoding.partition`  head/body/tail of a Llama-family model, read selectively
* :mod:`decoding.protocol`       the binary frame (small header + raw tensor)
* :mod:`service.split_worker.app`     ``tandem split-worker``: the body, per-session KV caches
* :mod:`decoding.backends.split_edge`       :class:`SplitVerifier`, a Verifier backend for the router
* :mod:`decoding.offline.split_audit`      ``tandem split audit``: inversion attack vs utility

This module stays import-light: the gateway calls :func:`route` per request.
"""

from __future__ import annotations

from typing import Any


def route(settings: Any, requested_mode: str | None, *, has_drafter: bool = True) -> tuple[bool, str]:
    """Decide (use_split, router_mode) for one request.

    ``requested_mode`` is the request's ``tandem.mode`` (None when absent).
    ``"split"`` asks for split inference: speculative over the split verifier
    when a drafter exists and ``split_speculative`` is on, else plain split
    decoding (``verifier-only`` over the split verifier). With
    ``split_policy == "always"`` every request is split, keeping its own mode
    (``drafter-only`` never touches a verifier, so it stays local).
    """
    spec = "speculative" if has_drafter and settings.split_speculative else "verifier-only"
    if requested_mode == "split":
        return True, spec
    if settings.split_policy == "always":
        if requested_mode in (None, ""):
            return True, spec
        if requested_mode == "drafter-only":
            return False, "drafter-only"
        return True, requested_mode if has_drafter or requested_mode == "verifier-only" else "verifier-only"
    return False, requested_mode or settings.mode
