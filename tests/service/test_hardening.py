"""Hardening (issue 15): what an attacker or a careless operator can do to a gateway, and what it must do back.

Numerics of tiny temperature / top_p, auth that cannot silently turn off, log injection, bounded memory per
request, connection limits, and protocol errors in OpenAI's envelope.
"""

from __future__ import annotations

import asyncio

import pytest

from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier

PROMPT = "def fib(n):\n"
TINY = [1e-45, 5e-324, 1e-300]


# -- numerics: tiny positive temperature and top_p are their limits, greedy and top-1 ------------------------------


@pytest.mark.parametrize("mode", ["speculative", "verifier-only"])
def test_tiny_temperature_and_top_p_are_greedy_through_the_router(mode, tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    options = SpecOptions(mode=mode)
    ids = tiny_tokenizer.encode(PROMPT)

    def tokens(**params) -> list[int]:
        return asyncio.run(router.generate(ids, SamplingParams(max_tokens=24, ignore_eos=True, **params), options)).token_ids

    greedy = tokens(temperature=0.0)
    for tiny in TINY:
        assert tokens(temperature=tiny, seed=1) == greedy, f"temperature={tiny}"
        assert tokens(temperature=1.0, top_p=tiny, seed=2) == greedy, f"top_p={tiny}"


def test_tiny_temperature_and_top_p_are_greedy_over_http(server):
    def text(**params) -> str:
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, **params}
        r = server.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    for tiny in TINY:
        assert text(temperature=tiny, seed=3) == greedy, f"temperature={tiny}"
        assert text(top_p=tiny, seed=4) == greedy, f"top_p={tiny}"
        assert text(temperature=tiny, stream=False, tandem={"mode": "verifier-only"}) == greedy


# -- auth cannot silently turn off -------------------------------------------------------------------------------


SECRET = "sk-live-abcdefghijklmnop"  # a real-looking key that must never be echoed


@pytest.mark.parametrize(
    "argv,env,says",
    [
        (["--api-key", ""], {}, "empty or whitespace"),  # `--api-key "$KEY"` with KEY unset
        (["--api-key", "   "], {}, "empty or whitespace"),
        ([], {"TANDEM_API_KEYS": ""}, "empty or whitespace"),
        ([], {"TANDEM_API_KEYS": f"{SECRET},,{SECRET}x"}, "key 2 of 3 is empty"),
        (["--api-key", SECRET[:15]], {}, "at least 16"),
        (["--api-key", f" {SECRET}"], {}, "whitespace"),
        (["--split-token", " "], {}, "split_token"),
    ],
)
def test_an_empty_whitespace_or_short_key_is_a_startup_error_naming_the_setting(argv, env, says, monkeypatch, capsys):
    from service.cli import main

    for key in [k for k in __import__("os").environ if k.startswith("TANDEM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", *argv]) == 2  # fails before loading any model
    err = capsys.readouterr().err
    assert err.startswith("tandem serve: error: invalid setting ") and says in err and "Traceback" not in err, err
    assert ("'split_token'" if "--split-token" in argv else "'api_keys'") in err
    assert SECRET[:15] not in err  # the rejected key is not echoed


def test_a_short_key_needs_allow_weak_keys(monkeypatch):
    from service.config import TandemSettings

    monkeypatch.delenv("TANDEM_API_KEYS", raising=False)
    settings = TandemSettings.load(api_keys=["short-key"], allow_weak_keys=True)
    assert [k.get_secret_value() for k in settings.api_keys] == ["short-key"]


def test_the_startup_log_states_how_many_keys_are_active(limited_server):
    from tests.service.conftest import LIMITED_KEY, LIMITED_OTHER_KEY

    log = limited_server.log()
    assert "auth on (2 API keys active)" in log
    assert LIMITED_KEY not in log and LIMITED_OTHER_KEY not in log


# -- logs: no request can forge a line ---------------------------------------------------------------------------------


FORGED = "FORGED7c1e status=200"


def test_cr_and_lf_in_a_field_name_cannot_forge_a_log_line(server):
    # An unknown field of the tandem object is a 400 whose error_param, logged, is the field's name.
    for name in (f"x\rstatus=200\n{FORGED}", f"y\n{FORGED}", f"z\u2028{FORGED}", f"w\x1b\r{FORGED}"):
        r = server.http.post("/v1/completions", json={"model": "tandem", "prompt": "x", "tandem": {name: 1}})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("tandem."), r.text
    server.http.get("/health")  # one more line after them
    log = server.log()
    lines = log.splitlines()  # splits at \r, \n, \x1c-\x1e, \x85, \u2028 and \u2029 too
    assert not [line for line in lines if line.startswith(FORGED)]
    logged = [line for line in lines if "error_param=" in line and "FORGED7c1e" in line]
    assert len(logged) == 4, logged
    assert all('error_param="tandem.' in line for line in logged)


def test_every_part_of_a_text_log_line_is_escaped():
    import logging
    import sys

    from service.logs import JSONFormatter, TextFormatter

    record = logging.LogRecord("tandem.access", logging.INFO, __file__, 1, "request %s", (f"a\r{FORGED}",), None)
    record.fields = {"error_param": f"p\n{FORGED}", f"k\r{FORGED}": "v", "status": 400, "route": "/v1/completions"}
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1 and " status=400 " in line and " route=/v1/completions" in line
    assert 'error_param="p\\nFORGED7c1e status=200"' in line and '"k\\rFORGED7c1e status=200"=v' in line
    try:
        raise ValueError(f"boom\n{FORGED}")
    except ValueError:
        record = logging.LogRecord("tandem", logging.ERROR, __file__, 1, "unhandled", (), sys.exc_info())
    text = TextFormatter().format(record)
    assert all(not line.startswith(FORGED) for line in text.splitlines()) and "\n    ValueError: boom" in text
    for json_line in (JSONFormatter().format(record),):
        assert len(json_line.splitlines()) == 1
