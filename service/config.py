"""tandem's configuration: one pydantic-settings object, passed down explicitly.

Sources, highest priority first: explicit values (CLI flags), ``TANDEM_*``
environment variables, a YAML or TOML file (``tandem serve --config FILE``),
then the defaults below. Invalid values fail at start with the setting named.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError


class ConfigError(ValueError):
    """Invalid configuration; the message names the setting."""


class TandemSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="forbid", validate_default=True)

    # -- models and backends ----------------------------------------------------
    verifier: str | None = Field(
        None, description="Verifier: a local model directory, or http(s)://host:port of a tandem verifier / vLLM server. "
        "Default: the shipped demo pair."
    )
    drafter: str | None = Field(
        None, description="Drafter: a local model directory, or 'ngram' for prompt lookup. Default: the demo pair's drafter."
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: the drafter's (or the verifier's).")
    model_name: str = Field("tandem", description="Model id served on /v1/models and accepted in requests.")
    device: str = Field("cpu", description="Torch device of the in-process models.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads of the in-process models (default: torch's choice, one per "
        "core). Models of a few million parameters run faster on 1: see BENCHMARKS.md.",
    )
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"

    # -- decoding defaults (per request overridable through the `tandem` object) --
    mode: Literal["speculative", "verifier-only", "drafter-only"] = "speculative"
    num_draft_tokens: int = Field(4, ge=1, le=32)
    min_draft_tokens: int = Field(1, ge=1, le=32)
    max_draft_tokens: int = Field(8, ge=1, le=32)
    adaptive_draft: bool = True
    draft_cost_ratio: float | None = Field(
        None, ge=0, description="Drafter step cost / verifier pass cost; default: ratio of parameter counts."
    )

    # -- remote verifier (vLLM) ---------------------------------------------------
    verifier_timeout_s: float = Field(10.0, gt=0)
    verifier_retries: int = Field(2, ge=0, le=10)
    verifier_backoff_s: float = Field(0.1, ge=0, description="First retry delay; doubles per retry, with jitter.")
    verifier_api_key: SecretStr | None = Field(None, description="Bearer key of the verifier server, if it has one.")
    verifier_fallback: Literal["none", "drafter-only"] = Field(
        "none", description="On an unavailable verifier: fail with 503 ('none') or finish the request drafter-only."
    )
    verifier_top_logprobs: int = Field(20, ge=1, le=1024)
    verifier_api: Literal["tandem", "stock"] = "tandem"

    # -- split inference (decoding/backends/split_edge.py, docs/split-inference.md) ----------------
    split_worker_url: str | None = Field(None, description="http(s)://host:port of the tandem split worker holding the body.")
    split_model: str | None = Field(None, description="Model directory split at split_layers; default: the local verifier.")
    split_layers: str = Field(
        "1:", pattern=r"^\d+:(-?\d+)?$",
        description="a:b; the edge runs [0,a) and [b,L), the worker [a,b). 'a:' = b is L; a negative b counts from the end.",
    )
    split_token: SecretStr | None = Field(None, description="Shared bearer token of the split worker (TANDEM_SPLIT_TOKEN).")
    split_noise_scale: float = Field(
        0.1, ge=0, description="Gaussian noise on the uplink, relative to each hidden state's norm (0.1: the audit's "
        "recommendation for the demo pair; 0 = exact, token-identical to the unsplit model, but invertible)."
    )
    split_wire_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Hidden-state dtype on the wire; 'auto' = the compute dtype (lossless). float16 halves "
        "the bytes of a float32 model but may flip near-tied greedy choices."
    )
    split_timeout_s: float = Field(10.0, gt=0)
    split_reconnect_s: float = Field(10.0, ge=0, description="Retry an unreachable worker this long before a 503.")
    split_policy: Literal["request", "always"] = Field(
        "request", description="'request': split when a request asks for tandem.mode='split'; 'always': every request."
    )
    split_speculative: bool = Field(True, description="Split requests draft k tokens on the edge per round trip.")
    split_session_ttl_s: float = Field(300.0, gt=0, description="Worker: evict sessions idle this long.")
    split_max_kv_bytes: int = Field(1 << 30, ge=1, description="Worker: bound on all sessions' KV caches.")
    split_max_body_bytes: int = Field(64 << 20, ge=1024, description="Worker: largest request frame accepted.")

    # -- HTTP server ------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="Bearer keys for /v1/*; empty = no auth.")
    max_concurrency: int = Field(4, ge=1, description="Generations running at once.")
    max_queue: int = Field(16, ge=0, description="Requests waiting for a slot; beyond it: 429.")
    request_timeout_s: float = Field(300.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=1)
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens of a request that sets none. Default: OpenAI's, 16 for completions and "
        "up to the context end for chat; never beyond the context."
    )
    log_json: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = Field(False, description="Log prompts and outputs. Off by default: the data is private.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):  # TANDEM_API_KEYS=key1,key2
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> TandemSettings:
        if not self.min_draft_tokens <= self.num_draft_tokens <= self.max_draft_tokens:
            raise ValueError(
                "draft lengths must satisfy min_draft_tokens <= num_draft_tokens <= max_draft_tokens, got "
                f"{self.min_draft_tokens} <= {self.num_draft_tokens} <= {self.max_draft_tokens}"
            )
        return self

    @property
    def remote_verifier(self) -> bool:
        return bool(self.verifier) and self.verifier.startswith(("http://", "https://"))

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
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"invalid setting {name!r}: {msg}" + (f" (got {err['input']!r})" if "input" in err and err["type"] != "extra_forbidden" else ""))
    return "; ".join(parts)
