"""The `tandem` command line: `generate` run as a user runs it (a subprocess), and the setting flags."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml
from pydantic import SecretStr

from service.cli import build_parser, main
from service.config import GatewaySettings, SplitWorkerSettings, TandemSettings
from service.setting_flags import FLAG_ALIASES, render_default, settings_from_args


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_speculative_equals_verifier_only(tiny_verifier_dir, tiny_drafter_dir):
    common = ["generate", "--prompt", "def main():\n", "--max-tokens", "24", "--json",
              "--verifier", str(tiny_verifier_dir), "--drafter", str(tiny_drafter_dir)]
    runs = {}
    for mode in ("speculative", "verifier-only"):
        proc = tandem(*common, "--mode", mode)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = json.loads(proc.stdout)
    spec, plain = runs["speculative"], runs["verifier-only"]
    assert spec["token_ids"] == plain["token_ids"] and len(spec["token_ids"]) > 0
    assert spec["text"] == plain["text"]
    stats = spec["stats"]
    assert stats["mode"] == "speculative" and stats["rounds"] >= 1
    assert stats["generated_tokens"] == len(spec["token_ids"])
    assert {"draft_tokens", "accepted_tokens", "acceptance_rate", "accepted_per_position", "verifier_forward_passes",
            "draft_time_s", "verify_time_s", "overhead_time_s"} <= stats.keys()


def test_generate_sampling_with_seed_is_reproducible(tiny_verifier_dir, tiny_drafter_dir):
    args = ["generate", "--prompt", "import os", "--max-tokens", "12", "--json", "--temperature", "0.8",
            "--top-k", "50", "--top-p", "0.9", "--seed", "7",
            "--verifier", str(tiny_verifier_dir), "--drafter", str(tiny_drafter_dir)]
    a, b = tandem(*args), tandem(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-5"], "top_k must be"),
        (["--drafter", "/nonexistent/model"], "'/nonexistent/model' does not exist"),
        (["--prompt", ""], "prompt is empty"),
    ],
)
def test_generate_bad_input_fails_with_a_clear_message(extra, message, tiny_verifier_dir, tiny_drafter_dir, capsys):
    # In-process through the same entry point as the console script (a subprocess
    # per case would spend most of its time importing torch).
    args = ["generate", "--prompt", "x", "--verifier", str(tiny_verifier_dir), "--drafter", str(tiny_drafter_dir)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_generate_rejects_a_pair_with_different_vocabularies(tiny_verifier_dir, other_vocab_drafter_dir):
    proc = tandem("generate", "--prompt", "x", "--verifier", str(tiny_verifier_dir),
                  "--drafter", str(other_vocab_drafter_dir))
    assert proc.returncode == 2
    assert "use different vocabularies" in proc.stderr and "must share one tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains_the_commands(capsys):
    for argv, words in [(["--help"], ["generate", "serve"]), (["generate", "--help"], ["--mode", "verifier-only"])]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words)


# -- setting flags: generated from service.config's fields --------------------------------------------------------


def subparser(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._actions
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def flags_by_setting(command: str) -> dict[str, tuple[str, ...]]:
    parser = subparser(command)
    settings = parser.get_default("setting_names")
    return {a.dest: tuple(a.option_strings) for a in parser._actions if a.dest in settings}


def test_every_setting_is_a_flag_named_after_it():
    # serve reads every setting but the split worker's, which `tandem split-worker` reads
    flags = {"serve": flags_by_setting("serve"), "split-worker": flags_by_setting("split-worker")}
    for name in TandemSettings.model_fields:
        command = "split-worker" if name in SplitWorkerSettings.model_fields else "serve"
        assert "--" + name.replace("_", "-") in flags[command].get(name, ()), (command, name)
    assert not set(SplitWorkerSettings.model_fields) & set(flags["serve"])
    assert set(FLAG_ALIASES) <= set(TandemSettings.model_fields)


def test_mode_choices_are_the_routers_modes():
    from decoding.speculative import MODES

    for command in ("generate", "serve"):
        mode = next(a for a in subparser(command)._actions if a.dest == "mode")
        assert tuple(mode.choices) == MODES


def test_help_does_not_import_torch():
    code = "import sys; from service.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def parse_settings(command: str, argv: list[str], env: dict[str, str], file: dict, tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("TANDEM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "tandem.yaml"
    path.write_text(yaml.safe_dump(file))
    required = {"split-worker": ["--model", "m", "--layers", "1:"], "generate": ["--prompt", "x"]}.get(command, [])
    return settings_from_args(build_parser().parse_args([command, *required, *argv, "--config", str(path)]))


def plain(value):
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value.get_secret_value() if isinstance(value, SecretStr) else value


# (command, setting, its flag spelling, three distinct values; a bool alternates, so each source still differs
# from the one below it)
SOURCES = [
    ("serve", "max_concurrency", "--max-concurrency", (7, 3, 2)),
    ("serve", "request_timeout_s", "--request-timeout", (5.5, 7.0, 9.25)),
    ("serve", "request_timeout_s", "--request-timeout-s", (5.5, 7.0, 9.25)),
    ("serve", "mode", "--mode", ("verifier-only", "drafter-only", "verifier-only")),
    ("serve", "adaptive_draft", "--no-adaptive", (False, True, False)),
    ("serve", "log_json", "--log-json", (True, False, True)),
    ("serve", "api_keys", "--api-key", (["a" * 16, "b" * 16], ["c" * 16], ["d" * 16, "e" * 16])),
    ("serve", "split_token", "--split-token", ("t1", "t2", "t3")),
    ("generate", "torch_threads", "--torch-threads", (1, 2, 3)),
    ("split-worker", "split_session_ttl_s", "--session-ttl", (5.0, 6.0, 7.0)),
    ("split-worker", "split_max_kv_bytes", "--max-kv-bytes", (4096, 8192, 1 << 20)),
    ("split-worker", "dtype", "--dtype", ("float16", "bfloat16", "float16")),
]


def as_flag(flag: str, value) -> list[str]:
    if isinstance(value, bool):
        return [flag] if value != flag.startswith("--no-") else []  # this spelling cannot say it: use the default
    if isinstance(value, list):
        return [arg for v in value for arg in (flag, v)]
    return [flag, str(value)]


def as_env(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(value) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("command, name, flag, values", SOURCES, ids=[f"{c}{f}" for c, _, f, _ in SOURCES])
def test_flag_env_and_file_give_one_value_with_flag_over_env_over_file(command, name, flag, values, tmp_path, monkeypatch):
    env_name = "TANDEM_" + name.upper()
    first, second, third = values
    parse = lambda argv=(), env={}, file={}: plain(getattr(  # noqa: E731
        parse_settings(command, list(argv), env, file, tmp_path, monkeypatch), name))

    # one value, through each source alone
    assert parse(argv=as_flag(flag, first)) == first
    assert parse(env={env_name: as_env(first)}) == first
    assert parse(file={name: first}) == first
    # flag > env > file > default
    default = plain(TandemSettings.model_fields[name].get_default(call_default_factory=True))
    assert parse(argv=as_flag(flag, first), env={env_name: as_env(second)}, file={name: third}) == first
    assert parse(env={env_name: as_env(second)}, file={name: third}) == second
    assert parse(file={name: third}) == third
    assert parse() == default


def test_bool_settings_have_both_spellings(tmp_path, monkeypatch):
    assert parse_settings("serve", ["--adaptive-draft"], {"TANDEM_ADAPTIVE_DRAFT": "0"}, {}, tmp_path, monkeypatch).adaptive_draft
    assert not parse_settings("serve", ["--no-adaptive-draft"], {}, {}, tmp_path, monkeypatch).adaptive_draft
    assert not parse_settings("serve", ["--no-split-speculative"], {}, {}, tmp_path, monkeypatch).split_speculative


def test_earlier_flag_spellings_still_work(tmp_path, monkeypatch):
    serve = parse_settings("serve", ["--api-key", "k1", "--api-key", "k2", "--allow-weak-keys", "--request-timeout", "5",
                                     "--shutdown-grace", "2", "--no-adaptive"], {}, {}, tmp_path, monkeypatch)  # fmt: skip
    assert plain(serve.api_keys) == ["k1", "k2"] and serve.request_timeout_s == 5 and serve.shutdown_grace_s == 2
    assert serve.adaptive_draft is False
    worker = parse_settings("split-worker", ["--session-ttl", "5", "--max-kv-bytes", "100", "--max-body-bytes", "2048",
                                             "--dtype", "float16", "--device", "cpu"], {}, {}, tmp_path, monkeypatch)  # fmt: skip
    assert (worker.split_session_ttl_s, worker.split_max_kv_bytes, worker.split_max_body_bytes) == (5, 100, 2048)
    assert (worker.dtype, worker.device) == ("float16", "cpu")


def test_a_bad_flag_value_fails_naming_the_setting(tmp_path, capsys):
    code = main(["split-worker", "--model", str(tmp_path), "--layers", "1:", "--session-ttl", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "split_session_ttl_s" in err and "greater than 0" in err and "Traceback" not in err


def help_blocks(command: str, monkeypatch, capsys) -> dict[str, str]:
    """Each option's --help entry, by its first spelling, on one line."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    blocks: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = line
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("command", ["generate", "serve", "split-worker"])
def test_help_explains_each_setting_with_its_default_from_the_field(command, monkeypatch, capsys):
    blocks = help_blocks(command, monkeypatch, capsys)
    for name in flags_by_setting(command):
        block = blocks["--" + name.replace("_", "-")]
        field = TandemSettings.model_fields[name]
        assert field.description.split(".")[0] in block, name
        default = field.get_default(call_default_factory=True)
        if default is None:  # the description says what unset means
            assert "(default:" not in block and "Default:" in block, name
        else:
            assert f"(default: {render_default(name, default)})" in block, name


def test_help_renders_defaults_readably(monkeypatch, capsys):
    serve = help_blocks("serve", monkeypatch, capsys)
    assert serve["--max-concurrency"].endswith("(default: 4)")
    assert serve["--request-timeout-s"].startswith("--request-timeout-s S, --request-timeout S ")
    assert serve["--request-timeout-s"].endswith("(default: 300s)")
    assert serve["--mode"].endswith("(default: speculative)")
    assert serve["--adaptive-draft"].startswith("--adaptive-draft, --no-adaptive-draft, --no-adaptive ")
    assert serve["--adaptive-draft"].endswith("(default: on)")
    assert serve["--api-keys"].endswith("(default: none)") and "Prefer TANDEM_API_KEYS" in serve["--api-keys"]
    worker = help_blocks("split-worker", monkeypatch, capsys)
    assert worker["--split-max-kv-bytes"].endswith("(default: 1073741824 = 1 GiB)")
    assert worker["--split-max-body-bytes"].endswith("(default: 67108864 = 64 MiB)")
    assert worker["--split-session-ttl-s"].endswith("(default: 300s)")


def test_help_follows_a_changed_default(monkeypatch, capsys):
    monkeypatch.setattr(GatewaySettings.model_fields["max_concurrency"], "default", 12)
    assert help_blocks("serve", monkeypatch, capsys)["--max-concurrency"].endswith("(default: 12)")
