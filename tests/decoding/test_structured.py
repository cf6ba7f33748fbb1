"""Structured outputs under speculation: the grammar mask on every verifier row (with the draft prefix it
follows) and on the drafter, the matcher rolled back past rejected drafts. Greedy output equals the constrained
verifier alone, every output parses and validates, and sampling has the exact constrained distribution."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re

import jsonschema
import pytest
import torch

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter, NgramDrafter
from decoding.sampling import InvalidRequestError, SamplingParams, logits_to_probs
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.structured import GrammarSpec, StructuredOutputError
from decoding.verifiers import HFVerifier
from tests.support.stats import chi2_pvalue

VERIFIER_ONLY = SpecOptions(mode="verifier-only")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z ]{1,6}$"},  # maxLength: see test_structured_api.py
        "kind": {"enum": ["cat", "dog", "owl"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "kind", "legs", "tags"],
    "additionalProperties": False,
}
SPECS = {
    "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA), any_whitespace=False),
    "regex": GrammarSpec("regex", r"(0|[1-9][0-9]{0,3})-[a-z]{2,5}(\.[a-z]{1,3}){1,2}"),
    "choice": GrammarSpec("choice", ("yes", "no", "maybe so", "it's \"complicated\"")),
    "grammar": GrammarSpec("grammar", 'root ::= "(" item (", " item){0,3} ")"\nitem ::= [a-c] | "x" [0-9]'),
}


def valid(kind: str, text: str) -> bool:
    spec = SPECS[kind]
    if kind == "json_schema":
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "regex":
        return re.fullmatch(spec.source, text) is not None
    if kind == "choice":
        return text in spec.source
    return re.fullmatch(r"\(([a-c]|x[0-9])(, ([a-c]|x[0-9])){0,3}\)", text) is not None


@pytest.fixture(scope="module")
def routers(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    verifier = HFVerifier(tiny_verifier_lm)
    return {
        "bad": SpeculativeRouter(verifier, HFDrafter(tiny_drafter_lm), tiny_tokenizer, SpecOptions(num_draft_tokens=4)),
        "perfect": SpeculativeRouter(verifier, HFDrafter(tiny_verifier_lm, cost_ratio=0.05), tiny_tokenizer,
                                     SpecOptions(num_draft_tokens=6, adaptive=False)),  # fmt: skip
        "ngram": SpeculativeRouter(verifier, NgramDrafter(tiny_verifier_lm.vocab_size), tiny_tokenizer,
                                   SpecOptions(num_draft_tokens=4, adaptive=False)),  # fmt: skip
    }


def run(router, ids, params, options=None):
    return asyncio.run(router.generate(ids, params, options))


def compile_(router, spec):
    return asyncio.run(router.compile_grammar(spec))


@pytest.mark.parametrize("kind", SPECS)
def test_greedy_constrained_output_equals_the_constrained_verifier_alone(kind, routers, tiny_tokenizer):
    ids = tiny_tokenizer.encode('{"name": "rex", "kind": "dog"} (a, b) 12-ab.cd yes no ')
    router = routers["bad"]
    params = SamplingParams(max_tokens=120, grammar=compile_(router, SPECS[kind]))
    alone = run(router, ids, params, VERIFIER_ONLY)
    assert alone.finish_reason == "stop" and valid(kind, alone.text), alone.text
    for name, r in routers.items():
        out = run(r, ids, params)
        assert out.token_ids == alone.token_ids, name
        assert out.text == alone.text
        if name == "perfect":  # the drafter is constrained too: it never proposes what the grammar forbids
            assert out.stats.accepted_tokens == out.stats.draft_tokens


@pytest.mark.parametrize("kind", SPECS)
def test_every_sampled_output_parses_and_validates(kind, routers, tiny_tokenizer):
    ids = tiny_tokenizer.encode("data = ")
    grammar = compile_(routers["bad"], SPECS[kind])
    for seed in range(12):
        params = SamplingParams(max_tokens=150, temperature=1.0, seed=seed, grammar=grammar, repetition_penalty=1.1)
        for name in ("bad", "ngram"):
            out = run(routers[name], ids, params)
            assert out.finish_reason == "stop", (name, seed, out.text)
            assert valid(kind, out.text), (name, seed, out.text)


def test_json_object_and_grammar_errors(routers, tiny_tokenizer):
    router = routers["bad"]
    out = run(router, tiny_tokenizer.encode("x"), SamplingParams(max_tokens=200, temperature=0.7, seed=1,
                                                                 grammar=compile_(router, GrammarSpec("json_object"))))  # fmt: skip
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    for spec, words in [(GrammarSpec("json_schema", '{"type": 5}', param="response_format"), "invalid json schema"),
                        (GrammarSpec("regex", "(", param="guided_regex"), "invalid regex"),
                        (GrammarSpec("grammar", "root ::= ", param="structured_outputs.grammar"), "invalid grammar"),
                        (GrammarSpec("choice", (), param="guided_choice"), "at least one")]:  # fmt: skip
        with pytest.raises(StructuredOutputError, match=words) as err:
            compile_(router, spec)
        assert isinstance(err.value, InvalidRequestError) and err.value.param == spec.param
        assert "cc:" not in str(err.value)  # the engine's source location is not the user's business


# -- the exact constrained distribution -----------------------------------------------------------------

#: Per position, the tokens the regex allows (written out independently of the grammar engine).
ALLOWED = [{1, 2}, {0, 3, 4}, {1, 2, 3}]
REGEX = "(w1|w2)(w0|w3|w4)(w1|w2|w3)"


def exact_constrained(lm: CausalLM, prompt: list[int], params: SamplingParams) -> dict[tuple, float]:
    dist = {}
    with torch.inference_mode():
        for seq in itertools.product(*[sorted(a) for a in ALLOWED]):
            logits = lm.model(torch.tensor([prompt + list(seq)])).logits[0, len(prompt) - 1 : -1].float()
            p = 1.0
            for i, allowed in enumerate(ALLOWED):
                row = logits[i].clone()
                row[[t for t in range(lm.vocab_size) if t not in allowed]] = float("-inf")
                p *= float(logits_to_probs(row[None], params)[0, seq[i]])
            dist[seq] = p
    return dist


@pytest.mark.parametrize("drafter_kind", ["model", "ngram"])
def test_sampled_constrained_output_has_the_exact_constrained_distribution(drafter_kind, small_vocab_pair):
    vlm, dlm = CausalLM(small_vocab_pair[0]), CausalLM(small_vocab_pair[1])
    tokenizer = load_tokenizer(small_vocab_pair[0])
    prompt = tokenizer.encode("w1 w0 w2 w3 w1 w0")  # n-gram lookup proposes "w2 w3", which the grammar admits
    drafter = HFDrafter(dlm) if drafter_kind == "model" else NgramDrafter(vlm.vocab_size)
    router = SpeculativeRouter(HFVerifier(vlm), drafter, tokenizer, SpecOptions(num_draft_tokens=2, adaptive=False))
    params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True,
                            grammar=compile_(router, GrammarSpec("regex", REGEX)))  # fmt: skip
    exact = exact_constrained(vlm, prompt, params)
    cells = sorted(exact)

    async def sample_all():
        counts = dict.fromkeys(cells, 0)
        drafted = accepted = 0
        for seed in range(2000):
            gen = await router.generate(prompt, dataclasses.replace(params, seed=seed))
            counts[tuple(gen.token_ids)] += 1
            drafted += gen.stats.draft_tokens
            accepted += gen.stats.accepted_tokens
        return counts, drafted, accepted

    counts, drafted, accepted = asyncio.run(sample_all())
    assert sum(counts.values()) == 2000  # nothing outside the grammar
    assert drafted > 0 and accepted < drafted  # drafts were proposed, and some were rejected (and rolled back)
    assert chi2_pvalue([counts[c] for c in cells], [exact[c] for c in cells]) > 1e-3


def test_json_strings_never_hold_control_characters(routers, tiny_tokenizer):
    """xgrammar 0.2.9 admits U+0000-U+001F in maxLength strings; tandem masks those tokens for JSON grammars,
    so strict parsers (pydantic, JavaScript) accept every output."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"]}
    grammar = compile_(routers["bad"], GrammarSpec("json_schema", json.dumps(schema), any_whitespace=False))
    ids = tiny_tokenizer.encode("data = ")
    for seed in range(20):
        for name in ("bad", "ngram"):
            out = run(routers[name], ids, SamplingParams(max_tokens=80, temperature=1.2, seed=seed, grammar=grammar))
            assert not any(ord(c) < 32 for c in out.text), (name, seed, out.text)
            if out.finish_reason == "stop":
                assert isinstance(json.loads(out.text)["s"], str)  # strict: control characters would fail
