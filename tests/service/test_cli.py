"""`tandem generate`, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.cli import main


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
