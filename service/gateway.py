"""The gateway's shared state: settings, backends, metrics, admission, the live jobs, and the drain."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from service.admission import Admission
from service.backends import Backends
from service.config import TandemSettings
from service.http import APIKeys
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.jobs import Job

log = logging.getLogger("tandem.gateway")


class Gateway:
    """Everything the routes share. ``backends`` is None until the app's lifespan has loaded them."""

    def __init__(self, settings: TandemSettings, backends: Backends | None):
        self.settings = settings
        self.backends = backends
        self.metrics = Metrics()
        self.metrics.max_concurrency.set(settings.max_concurrency)
        self.admission = Admission(settings.max_concurrency, settings.max_queue, on_change=self._admission_changed)
        self.api_keys = APIKeys(k.get_secret_value() for k in settings.api_keys)
        self.jobs: set[Job] = set()
        self.draining = False
        self.created = int(time.time())
        self._cutoff: asyncio.TimerHandle | None = None
        self._fingerprint: str | None = None

    def _admission_changed(self, in_use: int, waiting: int) -> None:
        self.metrics.requests_running.set(in_use)
        self.metrics.requests_waiting.set(waiting)

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint``: changes with the model name, dtype, device or backends."""
        if self._fingerprint is None:
            b = self.backends
            parts = [self.settings.model_name, self.settings.dtype, self.settings.device]
            if b is not None:
                parts += [b.verifier.name, b.drafter.name if b.drafter else "-"]
            self._fingerprint = "fp_tandem_" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
        return self._fingerprint

    def begin_drain(self, grace_s: float) -> None:
        """Stop admitting requests; cut off the remaining generations after ``grace_s``."""
        if self.draining:
            return
        self.draining = True
        self.admission.close()
        log.info("draining: %d generation(s) in flight, grace %.1fs", len(self.jobs), grace_s)
        self._cutoff = asyncio.get_running_loop().call_later(grace_s, self.cut_off)

    def cut_off(self) -> None:
        if self.jobs:
            log.warning("shutdown grace period over: cutting off %d request(s)", len(self.jobs))
        for job in list(self.jobs):
            job.abort("shutdown")

    async def aclose(self) -> None:
        if self._cutoff is not None:
            self._cutoff.cancel()
        self.cut_off()
        if self.backends is not None:
            await self.backends.aclose()
