"""The gateway tests' servers: real ``tandem serve`` subprocesses (tests/support/gateway.py) on the tiny models
from tests/conftest.py, all spawned at once when the first is needed, each waited for on its own path.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tests import these helpers from here too.
from loadtests.procs import REPO, free_port  # noqa: F401
from loadtests.prometheus import total as sum_metric  # noqa: F401
from tests.support.gateway import Gateway, model_args, start_server, wait_until_up  # noqa: F401


# -- the servers ------------------------------------------------------------------------------------
# Every server the selected tests need is spawned at once, when the first one is requested, so
# their start-ups (importing torch, loading models) overlap; each fixture then waits for its own.

LIMITED_KEY = "sk-test-limited-0123456789"
LIMITED_OTHER_KEY = "sk-test-second-key"
SERVER_FIXTURES = ("server", "limited_server", "fuzz_server", "verifier_down_server", "drain_server", "tools_server")


def pytest_collection_modifyitems(config, items):
    config._tandem_servers = {name for item in items for name in getattr(item, "fixturenames", ()) if name in SERVER_FIXTURES}


def _spec_server(request, root: Path) -> dict:
    """The main gateway: tiny pair, speculative by default, 4 slots, queue 16, no auth."""
    return dict(args=(*model_args(*request.getfixturevalue("tiny_pair")), "--max-concurrency", "4", "--max-queue", "16"))


def _spec_limited_server(request, root: Path) -> dict:
    """Auth on (keys from TANDEM_API_KEYS), 1 slot, queue 1, a 4 s request timeout; settings from a YAML file."""
    verifier, drafter = request.getfixturevalue("tiny_pair")
    config = root / "tandem.yaml"
    config.write_text(
        f"verifier: {verifier}\n"
        f"drafter: {drafter}\n"
        "model_name: tiny-limited\n"
        "max_concurrency: 1\n"
        "max_queue: 1\n"
        "request_timeout_s: 4\n"
        "shutdown_grace_s: 2\n"
    )
    return dict(
        args=("--config", str(config)),
        env={"TANDEM_API_KEYS": f"{LIMITED_KEY},{LIMITED_OTHER_KEY}"},
        api_key=LIMITED_KEY,
        model="tiny-limited",
    )


def _spec_fuzz_server(request, root: Path) -> dict:
    """64-token context models: every generation is short, so fuzzing stays fast."""
    return dict(args=(*model_args(*request.getfixturevalue("short_context_pair")), "--max-concurrency", "2",
                      "--max-queue", "64"))  # fmt: skip


def _spec_verifier_down_server(request, root: Path) -> dict:
    """The verifier is a vLLM URL where nothing listens: a real outage (the drafter is local)."""
    return dict(
        args=("--verifier", f"http://127.0.0.1:{free_port()}", "--drafter", str(request.getfixturevalue("tiny_drafter_dir"))),
        env={"TANDEM_VERIFIER_RETRIES": "0", "TANDEM_VERIFIER_TIMEOUT_S": "2"},
        ready_path="/health",
    )


#: A Hermes-style chat template with tool support (Qwen 2.5's layout): tools listed in the system turn,
#: calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>, results as <tool_response>.
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions.\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\n\nFor each function call, return a json object within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content or '' }}"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def _spec_tools_server(request, root: Path) -> dict:
    """The tiny pair with a tool-capable chat template (its tokenizer, saved with TOOL_CHAT_TEMPLATE), and
    JSON without free whitespace (random models would pad it until max_tokens): for structured outputs,
    tools, and the LangChain / LiteLLM / openai clients."""
    from decoding.causal_lm import load_tokenizer

    verifier, drafter = request.getfixturevalue("tiny_pair")
    tokenizer = load_tokenizer(verifier)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "tokenizer")
    shutil.copy(verifier / "config.json", root / "tokenizer")  # a tokenizer directory is a model directory here
    return dict(args=(*model_args(verifier, drafter), "--tokenizer", str(root / "tokenizer")),
                env={"TANDEM_STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE": "true"})  # fmt: skip


def _spec_drain_server(request, root: Path) -> dict:
    """For the SIGTERM test (which stops it): 2 s grace, 5 slots, JSON logs."""
    return dict(args=(*model_args(*request.getfixturevalue("tiny_pair")), "--shutdown-grace", "2",
                      "--max-concurrency", "5", "--log-json"))  # fmt: skip


@pytest.fixture(scope="session")
def _spawned(request, tmp_path_factory) -> Iterator[dict[str, tuple[Gateway, str]]]:
    wanted = getattr(request.config, "_tandem_servers", set(SERVER_FIXTURES))
    spawned: dict[str, tuple[Gateway, str]] = {}
    for name in SERVER_FIXTURES:
        if name not in wanted:
            continue
        root = tmp_path_factory.mktemp(name)
        spec = globals()[f"_spec_{name}"](request, root)
        ready_path = spec.pop("ready_path", "/ready")
        spawned[name] = (start_server(root / "serve.log", *spec.pop("args"), wait_ready=False, **spec), ready_path)
    yield spawned
    # SIGTERM all at once (each drains and exits on its own), then check that every one exited 0.
    for s, _ in spawned.values():
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    failed = {name: s.stop() for name, (s, _) in spawned.items()}
    failed = {name: code for name, code in failed.items() if code != 0}
    assert not failed, {name: (code, spawned[name][0].log()[-2000:]) for name, code in failed.items()}


def _serve(spawned: dict, name: str) -> Iterator[Gateway]:
    s, ready_path = spawned[name]
    wait_until_up(s, ready_path)
    yield s  # stopped, and its exit status checked, by _spawned


@pytest.fixture(scope="session")
def server(_spawned) -> Iterator[Gateway]:
    yield from _serve(_spawned, "server")


@pytest.fixture(scope="session")
def limited_server(_spawned) -> Iterator[Gateway]:
    yield from _serve(_spawned, "limited_server")


@pytest.fixture(scope="session")
def fuzz_server(_spawned) -> Iterator[Gateway]:
    yield from _serve(_spawned, "fuzz_server")


@pytest.fixture(scope="session")
def verifier_down_server(_spawned) -> Iterator[Gateway]:
    yield from _serve(_spawned, "verifier_down_server")


@pytest.fixture(scope="session")
def tools_server(_spawned) -> Iterator[Gateway]:
    yield from _serve(_spawned, "tools_server")


@pytest.fixture
def drain_server(_spawned) -> Gateway:
    return next(_serve(_spawned, "drain_server"))  # the test stops it


@pytest.fixture(scope="session")
def short_context_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pair with a 64-token context."""
    from dataclasses import replace

    from decoding.causal_lm import load_tokenizer
    from decoding.offline.tiny_models import TINY_DRAFTER, TINY_VERIFIER, build_model, build_tiny_pair

    root = tmp_path_factory.mktemp("shortctx")
    verifier, _ = build_tiny_pair(root / "base", seed=3)
    tokenizer = load_tokenizer(verifier)
    v = build_model(root / "verifier", tokenizer, replace(TINY_VERIFIER, max_position_embeddings=64), seed=3)
    d = build_model(root / "drafter", tokenizer, replace(TINY_DRAFTER, max_position_embeddings=64), seed=4)
    return v, d
