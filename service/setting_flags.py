"""Command-line flags generated from the settings fields (service.config), so each setting is declared once.

The setting ``max_concurrency`` is the flag ``--max-concurrency``: its type, choices (a ``Literal``) and the default
shown in ``--help`` come from the field, its help text from the field's description. A bool is ``--x`` / ``--no-x``,
a list a repeatable flag. A flag's default is None, meaning "not given": :func:`settings_from_args` then leaves the
setting to ``TANDEM_*``, the ``--config`` file or the field's default.
"""

from __future__ import annotations

import argparse
import inspect
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service.config import SettingsGroup, TandemSettings

#: Spellings of earlier releases, accepted next to the generated ``--field-name``.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "adaptive_draft": ("--no-adaptive",),
    "api_keys": ("--api-key",),
    "request_timeout_s": ("--request-timeout",),
    "shutdown_grace_s": ("--shutdown-grace",),
    "split_session_ttl_s": ("--session-ttl",),
    "split_max_kv_bytes": ("--max-kv-bytes",),
    "split_max_body_bytes": ("--max-body-bytes",),
}

#: Placeholders that say more than the type's.
METAVARS: dict[str, str] = {
    "verifier": "DIR|URL",
    "drafter": "DIR|ngram",
    "tokenizer": "DIR",
    "split_model": "DIR",
    "split_layers": "A:B",
    "num_draft_tokens": "K",
    "min_draft_tokens": "K",
    "max_draft_tokens": "K",
}


class _Switch(argparse.Action):
    """A bool setting: ``--x`` sets it, any ``--no-...`` spelling clears it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or (get_origin(annotation) is list and get_args(annotation) == (SecretStr,))


def render_default(name: str, value: Any) -> str:
    """A field's default as ``--help`` shows it; units from the naming convention (``_s`` seconds, ``_bytes``)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, float):
        value = f"{value:g}"
    if name.endswith("_s"):
        return f"{value}s"
    if name.endswith("_bytes") and isinstance(value, int):
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value} = {value // size} {unit}"
    return str(value)


def _flag_help(name: str, field: FieldInfo) -> str:
    parts = [field.description or ""]
    annotation = _unwrap_optional(field.annotation)
    if get_origin(annotation) is list:
        parts.append("Repeatable.")
    if _is_secret(annotation):
        parts.append(f"Prefer TANDEM_{name.upper()}: command-line arguments are visible to other local users.")
    default = field.get_default(call_default_factory=True)
    if default is not None:
        parts.append(f"(default: {render_default(name, default)})")
    return " ".join(parts).replace("%", "%%")


def _add_setting_flag(group: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    flags = ["--" + name.replace("_", "-")]
    annotation = _unwrap_optional(field.annotation)
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _flag_help(name, field)}
    if annotation is bool:
        flags.append("--no-" + name.replace("_", "-"))
        kwargs["action"] = _Switch
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = get_args(annotation)
    elif get_origin(annotation) is list:
        kwargs.update(action="append", metavar="KEY" if _is_secret(annotation) else "VALUE")
    elif annotation in (int, float, str, SecretStr):
        kwargs["type"] = {int: int, float: float}.get(annotation, str)
        kwargs["metavar"] = METAVARS.get(name) or (
            "KEY" if annotation is SecretStr
            else "URL" if name.endswith("_url")
            else "S" if name.endswith("_s")
            else {int: "N", float: "X", str: name.upper()}[annotation]
        )  # fmt: skip
    else:  # a new kind of setting: give it a command-line form here
        raise TypeError(f"setting {name!r} has no command-line form for {field.annotation}")
    group.add_argument(*flags, *FLAG_ALIASES.get(name, ()), **kwargs)


def add_settings(parser: argparse.ArgumentParser, *groups: type[SettingsGroup]) -> None:
    """Give a subcommand ``--config FILE`` and one flag per field of ``groups``, titled by group."""
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML settings file, keys as the setting names")
    for group in groups:
        title, _, description = inspect.cleandoc(group.__doc__ or group.__name__).partition("\n")
        arguments = parser.add_argument_group(title.rstrip("."), description.strip() or None)
        for name, field in group.model_fields.items():
            _add_setting_flag(arguments, name, field)
    names = tuple(name for group in groups for name in group.model_fields)
    parser.set_defaults(setting_names=names)
    parser.epilog = (
        "Each setting flag --x-y is also the environment variable TANDEM_X_Y and the key x_y of --config FILE; "
        "a flag wins over the environment, the environment over the file."
    )


def settings_from_args(args: argparse.Namespace) -> TandemSettings:
    """The settings a parsed command line asks for: its setting flags > TANDEM_* > --config FILE > defaults."""
    overrides = {name: getattr(args, name) for name in getattr(args, "setting_names", ())}
    return TandemSettings.load(getattr(args, "config", None), **overrides)
