"""tandem's configuration: one pydantic-settings object, passed down explicitly.

Sources, highest priority first: explicit values (CLI flags), ``TANDEM_*``
environment variables, a YAML or TOML file (``tandem serve --config FILE``),
then the defaults below. Invalid values fail at start with the setting named.

Every setting is declared once, as a field of the settings group of its
concern (:class:`ModelSettings`, :class:`TorchSettings`,
:class:`DecodingSettings`, :class:`VLLMClientSettings`,
:class:`SplitEdgeSettings`, :class:`SplitWorkerSettings`,
:class:`GatewaySettings`, :class:`LoggingSettings`). A group is a plain
pydantic model; :class:`TandemSettings` inherits all of them, so every
setting stays flat: one attribute ``settings.max_concurrency``, one variable
``TANDEM_MAX_CONCURRENCY``, one file key ``max_concurrency``. Everything
else is derived from the fields: the CLI flags (``service.cli``: name, type,
choices, help and the default shown), the env names, the validation.

Code that needs one concern types its parameter as that group:
``TandemSettings`` is an instance of every group, so it can be passed as is,
and ``settings.group(SplitWorkerSettings)`` returns the slice alone, as its
own validated model. The groups partition the fields: each setting belongs
to exactly one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator,
)  # fmt: skip
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from decoding.modes import Mode


class ConfigError(ValueError):
    """Invalid configuration; the message names the setting."""


#: Shortest API key accepted without ``allow_weak_keys``.
MIN_KEY_CHARS = 16


def check_secret(secret: SecretStr, what: str) -> SecretStr:
    """Refuse an empty or whitespace-padded bearer secret (it would disable auth, or never match)."""
    value = secret.get_secret_value()
    if not value.strip():
        raise ValueError(f"{what} is empty or whitespace, which would turn authentication off; remove it or set a key")
    if value != value.strip():
        raise ValueError(f"{what} has leading or trailing whitespace, so no request could ever match it")
    return secret


class SettingsGroup(BaseModel):
    """The settings of one concern. The first line of a group's docstring titles its flags in ``--help``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(SettingsGroup):
    """Models.

    Which verifier and drafter to load (in-process or behind a URL).
    """

    verifier: str | None = Field(
        None, description="Verifier: a local model directory, or http(s)://host:port of a tandem verifier / vLLM server. "
        "Default: the shipped demo pair."
    )
    drafter: str | None = Field(
        None, description="Drafter: a local model directory, or 'ngram' for prompt lookup. Default: the demo pair's drafter."
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory. Default: the drafter's (or the verifier's).")

    @property
    def remote_verifier(self) -> bool:
        return bool(self.verifier) and self.verifier.startswith(("http://", "https://"))


class TorchSettings(SettingsGroup):
    """In-process models (torch)."""

    device: str = Field("cpu", description="Torch device of the in-process models.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the in-process models.")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads of the in-process models. Default: torch's choice, one per "
        "core. Models of a few million parameters run faster on 1: see BENCHMARKS.md.",
    )
    max_batch: int = Field(
        8, ge=1, le=256, description="The most concurrent requests whose passes an in-process model runs as one "
        "forward (continuous batching with per-request KV caches: the verifier's verify passes, the drafter's "
        "steps); 1 runs one request per pass.",
    )


class DecodingSettings(SettingsGroup):
    """Decoding.

    Server-wide defaults; a request may override mode and draft lengths in its tandem object.
    """

    mode: Mode = Field(
        "speculative", description="'speculative': the drafter proposes, the verifier decides; 'verifier-only': the "
        "verifier alone; 'drafter-only': the drafter alone, unverified."
    )
    num_draft_tokens: int = Field(4, ge=1, le=32, description="Draft length k of the first round.")
    min_draft_tokens: int = Field(1, ge=1, le=32, description="Lower bound of the adaptive draft length.")
    max_draft_tokens: int = Field(8, ge=1, le=32, description="Upper bound of the adaptive draft length.")
    adaptive_draft: bool = Field(True, description="Adapt k to the recent acceptance; off: k stays fixed.")
    draft_cost_ratio: float | None = Field(
        None, ge=0, description="Drafter step cost / verifier pass cost. Default: the ratio of parameter counts."
    )
    kernel_backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="Kernel of the acceptance step; 'auto': Triton on CUDA tensors, torch elsewhere."
    )
    structured_outputs_disable_any_whitespace: bool = Field(
        False, description="Structured JSON outputs get no whitespace between tokens, as vLLM's "
        "--structured-outputs-config.disable_any_whitespace (a request's structured_outputs.disable_any_whitespace "
        "asks for it too). Weak models may otherwise pad JSON with whitespace until max_tokens.",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> DecodingSettings:
        if not self.min_draft_tokens <= self.num_draft_tokens <= self.max_draft_tokens:
            raise ValueError(
                "draft lengths must satisfy min_draft_tokens <= num_draft_tokens <= max_draft_tokens, got "
                f"{self.min_draft_tokens} <= {self.num_draft_tokens} <= {self.max_draft_tokens}"
            )
        return self


class VLLMClientSettings(SettingsGroup):
    """Remote verifier (verifier = http://...).

    How tandem talks to a `tandem verifier` or stock vLLM server (decoding/backends/vllm_client.py).
    """

    verifier_timeout_s: float = Field(10.0, gt=0, description="Timeout of one verify round, in seconds.")
    verifier_retries: int = Field(2, ge=0, le=10, description="Retries of a failed verify round.")
    verifier_backoff_s: float = Field(0.1, ge=0, description="First retry delay; doubles per retry, with jitter.")
    verifier_api_key: SecretStr | None = Field(
        None, description="Bearer key of the verifier server. Default: none (a server without auth)."
    )
    verifier_fallback: Literal["none", "drafter-only"] = Field(
        "none", description="On an unavailable verifier: fail with 503 ('none') or finish the request drafter-only."
    )
    verifier_top_logprobs: int = Field(
        20, ge=1, le=1024, description="K, logprobs per verified position; sampling is exact for request top_k <= K."
    )
    verifier_api: Literal["tandem", "stock"] = Field(
        "tandem", description="'tandem': a server started with `tandem verifier`; 'stock': any vLLM /v1/completions "
        "(recomputes the whole context every round: see docs/vllm-verifier.md)."
    )


class SplitEdgeSettings(SettingsGroup):
    """Split inference, edge side.

    The gateway runs a model's first and last layers and a split worker the middle ones
    (decoding/backends/split_edge.py, docs/split-inference.md).
    """

    split_worker_url: str | None = Field(
        None, description="http(s)://host:port of the tandem split worker holding the body. Default: none (no split "
        "inference)."
    )
    split_model: str | None = Field(None, description="Model directory split at split_layers. Default: the local verifier.")
    split_layers: str = Field(
        "1:", pattern=r"^\d+:(-?\d+)?$",
        description="a:b; the edge runs [0,a) and [b,L), the worker [a,b). 'a:' = b is L; a negative b counts from the end.",
    )
    split_token: SecretStr | None = Field(
        None, description="Shared bearer token of the split worker. Default: none (no auth); an empty or whitespace "
        "token is a start-up error.",
    )
    split_noise_scale: float = Field(
        0.1, ge=0, description="Gaussian noise on the uplink, relative to each hidden state's norm (0.1: the audit's "
        "recommendation for the demo pair; 0 = exact, token-identical to the unsplit model, but invertible)."
    )
    split_wire_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Hidden-state dtype on the wire; 'auto' = the compute dtype (lossless). float16 halves "
        "the bytes of a float32 model but may flip near-tied greedy choices."
    )
    split_timeout_s: float = Field(10.0, gt=0, description="Timeout of one round trip to the worker, in seconds.")
    split_reconnect_s: float = Field(10.0, ge=0, description="Retry an unreachable worker this long before a 503.")
    split_policy: Literal["request", "always"] = Field(
        "request", description="'request': split when a request asks for tandem.mode='split'; 'always': every request."
    )
    split_speculative: bool = Field(True, description="Split requests draft k tokens on the edge per round trip.")

    @field_validator("split_token")
    @classmethod
    def _check_token(cls, token: SecretStr | None) -> SecretStr | None:
        return token if token is None else check_secret(token, "the token")


class SplitWorkerSettings(SettingsGroup):
    """Split worker (tandem split-worker).

    Bounds of the worker process; its bearer token is split_token, shared with the edge.
    """

    split_session_ttl_s: float = Field(300.0, gt=0, description="Worker: evict sessions idle this long.")
    split_max_kv_bytes: int = Field(1 << 30, ge=1, description="Worker: bound on all sessions' KV caches.")
    split_max_body_bytes: int = Field(64 << 20, ge=1024, description="Worker: largest request frame accepted.")


class GatewaySettings(SettingsGroup):
    """HTTP server.

    The OpenAI-compatible gateway: binding, auth, admission and request limits.
    """

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Port.")
    model_name: str = Field("tandem", description="Model id served on /v1/models and accepted in requests.")
    allow_weak_keys: bool = Field(
        False, description=f"Accept API keys shorter than {MIN_KEY_CHARS} characters (tests, never production)."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for /v1/*, comma-separated in TANDEM_API_KEYS; none = no auth. "
        f"An empty or whitespace key, or one shorter than {MIN_KEY_CHARS} characters, is a start-up error.",
    )
    max_concurrency: int = Field(4, ge=1, description="Generations running at once.")
    max_queue: int = Field(16, ge=0, description="Requests waiting for a slot; beyond it: 429.")
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request timeout, queueing included.")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight requests may finish before being cut off."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt accepted, in tokens; longer: 400. Default: no limit but the context."
    )
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens of a request that sets none. Default: OpenAI's, 16 for completions and "
        "up to the context end for chat; never beyond the context."
    )
    max_request_bytes: int = Field(
        8 << 20, ge=1024, description="Largest request body; larger: 413. Parsing a body can take up to ~50x its "
        "size in memory (docs/gateway.md, Memory)."
    )
    max_preparing: int = Field(
        2, ge=1, description="Generation requests read, parsed, templated and tokenized at once (before admission); "
        "the others wait, without their bodies read."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body must arrive whole within this of the request's start; else 408."
    )
    max_messages: int = Field(
        2048, ge=1, description="Chat: messages plus content parts of a request, at most; more: 400."
    )
    max_content_bytes: int | None = Field(
        None, ge=1, description="Chat: total UTF-8 bytes of the messages' content, at most; more: 400. Default: what "
        "the context can hold (max_context x the longest token of the vocabulary, in bytes)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections at most; past it, the connection that waited longest for a "
        "request is closed (or the new one, when all have a request in flight). Needs max_connections + 128 file "
        "descriptors (RLIMIT_NOFILE; the soft limit is raised to fit, else start-up fails)."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request's line and headers must arrive within this of the connection's "
        "opening or of its previous response; else the connection is closed."
    )
    keep_alive_s: float = Field(5.0, gt=0, description="Idle keep-alive connections are closed after this.")
    max_header_bytes: int = Field(
        16 << 10, ge=1024, description="Largest request line + headers (h11); larger: 400."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):  # TANDEM_API_KEYS=key1,key2; "" and "a,,b" keep their empty keys, refused below
            return [k.strip() for k in value.split(",")]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        # An empty key must not turn auth off: `--api-key "$KEY"` with KEY unset is the likely way to get one.
        for i, key in enumerate(keys):
            check_secret(key, f"key {i + 1} of {len(keys)}")
            if len(key.get_secret_value()) < MIN_KEY_CHARS and not info.data.get("allow_weak_keys"):
                raise ValueError(
                    f"key {i + 1} of {len(keys)} has {len(key.get_secret_value())} characters; API keys need at least "
                    f"{MIN_KEY_CHARS} (or set allow_weak_keys / --allow-weak-keys)"
                )
        return keys


class LoggingSettings(SettingsGroup):
    """Logging."""

    log_json: bool = Field(False, description="JSON-lines logs.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_prompts: bool = Field(False, description="Log prompts and outputs. Keep it off where the data is private.")


#: Every group, in the order of ``--help``.
SETTINGS_GROUPS: tuple[type[SettingsGroup], ...] = (
    ModelSettings, TorchSettings, DecodingSettings, VLLMClientSettings, SplitEdgeSettings, SplitWorkerSettings,
    GatewaySettings, LoggingSettings,
)  # fmt: skip

G = TypeVar("G", bound=SettingsGroup)


# pydantic collects inherited fields from the last base to the first: the groups are listed in reverse so that the
# fields (and the errors naming them) come in SETTINGS_GROUPS order.
class TandemSettings(
    LoggingSettings, GatewaySettings, SplitWorkerSettings, SplitEdgeSettings, VLLMClientSettings, DecodingSettings,
    TorchSettings, ModelSettings, BaseSettings,
):  # fmt: skip
    """All settings, flat: each group's fields, read from ``TANDEM_*`` variables and a config file."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="forbid", validate_default=True)

    def group(self, cls: type[G]) -> G:
        """This configuration's values of one group, as that group's model."""
        return cls.model_validate({name: getattr(self, name) for name in cls.model_fields})

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> TandemSettings:
        """Build settings from overrides > env > file > defaults; raise ConfigError."""
        file_values = read_config_file(config_file) if config_file else {}
        overrides = {k: v for k, v in overrides.items() if v is not None}

        class _WithFile(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(
                cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings, env_settings, _DictSource(settings_cls, file_values))

        try:
            settings = _WithFile(**overrides)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None
        return cls.model_construct(**{name: getattr(settings, name) for name in cls.model_fields})


class _DictSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]):
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of setting names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "configuration"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        # A secret's value is never echoed, not even a rejected one: it may be a real key with a typo.
        setting = str(err["loc"][0]) if err["loc"] else ""
        shown = "input" in err and err["type"] != "extra_forbidden" and not _is_secret_setting(setting)
        parts.append(f"invalid setting {name!r}: {msg}" + (f" (got {err['input']!r})" if shown else ""))
    return "; ".join(parts)


def _is_secret_setting(name: str) -> bool:
    field = TandemSettings.model_fields.get(name)
    return field is not None and "SecretStr" in str(field.annotation)
