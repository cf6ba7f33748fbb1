"""The verify routes as a vLLM endpoint plugin, for a vLLM launched by other means than ``tandem verifier``.

Registered in tandem's package metadata (pyproject.toml)::

    [project.entry-points."vllm.endpoint_plugins"]
    tandem_verify = "service.vllm.plugin:TandemEndpointPlugin"

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``:
``VLLM_PLUGINS=tandem_verify vllm serve ...`` serves the same routes as
``tandem verifier``. vLLM loads the plugin in every API server process, so this
is also the way with ``--api-server-count > 1`` (the launcher patches its own
process only). The route's limits come from the environment:
``TANDEM_VERIFY_MAX_SESSIONS`` and ``TANDEM_VERIFY_SESSION_TTL_S``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from service.vllm.route import build_router
from service.vllm.sessions import StoreLimits

PLUGIN_NAME = "tandem_verify"
MAX_SESSIONS_ENV = "TANDEM_VERIFY_MAX_SESSIONS"
SESSION_TTL_ENV = "TANDEM_VERIFY_SESSION_TTL_S"


def limits_from_env(env: Mapping[str, str] = os.environ) -> StoreLimits:
    """The route's limits from the environment; unset variables keep StoreLimits' defaults."""
    defaults = StoreLimits()
    try:
        return StoreLimits(
            max_sessions=int(env.get(MAX_SESSIONS_ENV, defaults.max_sessions)),
            ttl_s=float(env.get(SESSION_TTL_ENV, defaults.ttl_s)),
        )
    except ValueError as exc:
        raise ValueError(f"{MAX_SESSIONS_ENV} / {SESSION_TTL_ENV}: {exc}") from None


class TandemEndpointPlugin:
    """vLLM's ``EndpointPlugin`` protocol (``vllm.plugins.endpoint_plugins.interface``)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        app.include_router(build_router(limits_from_env()))

    async def init_state(self, engine_client, state, args) -> None:
        return None  # the routes create their state from state.engine_client on first use


def plugin_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether vLLM will attach the routes itself: ``VLLM_PLUGINS`` names the plugin and its entry point is installed."""
    if PLUGIN_NAME not in env.get("VLLM_PLUGINS", "").split(","):  # vLLM's own parsing of the variable
        return False
    from importlib.metadata import entry_points

    return bool(entry_points(group="vllm.endpoint_plugins", name=PLUGIN_NAME))
