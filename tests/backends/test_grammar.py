"""The grammar cache and matchers on the demo tokenizer: masks, keyed caching, refusals,
and the tool-call grammars of every family."""

from __future__ import annotations

import json

import pytest

from hotweights.backends.chat_template import detect_tool_format
from hotweights.backends.grammar import GrammarCache, GrammarMatcher, GrammarTokenizer
from hotweights.demo.tinylm import CHAT_TEMPLATE, build_tokenizer
from hotweights.errors import InvalidRequest
from hotweights.generation import JsonOutput, ToolCallFormat, ToolCallOutput

pytestmark = pytest.mark.llm

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"level": {"enum": ["low", "high"]}, "n": {"type": "integer", "maximum": 9}},
        "required": ["level", "n"],
        "additionalProperties": False,
    }
)
PARAMETERS = json.dumps(
    {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return build_tokenizer()


def _vocabulary(cache: GrammarCache, tokenizer: object) -> GrammarTokenizer:
    size = len(tokenizer)  # type: ignore[arg-type]
    return cache.tokenizer(tokenizer, size, {tokenizer.eos_token_id})  # type: ignore[arg-type, attr-defined]


def _follow(matcher: GrammarMatcher, ids: list[int]) -> None:
    for token in ids:
        assert matcher.allowed()[token], f"token {token} was masked out"
        matcher.accept(token)


def test_the_mask_allows_exactly_the_schema_and_then_only_the_end(tokenizer: object) -> None:
    import torch

    cache = GrammarCache()
    matcher = cache.matcher(_vocabulary(cache, tokenizer), JsonOutput(SCHEMA))
    ids = tokenizer.encode('{"level": "high", "n": 7}', add_special_tokens=False)  # type: ignore[attr-defined]
    first = matcher.allowed()
    assert first[ids[0]]
    assert int(first.sum()) == 1  # only `{`
    logits = torch.zeros(len(tokenizer))  # type: ignore[arg-type]
    matcher.mask(logits)
    assert torch.isinf(logits).sum() == len(tokenizer) - 1  # type: ignore[arg-type]
    _follow(matcher, ids)
    assert matcher.complete
    assert cache.stats().masks == 2 + len(ids)  # every mask computed is counted


def test_compiled_grammars_are_cached_by_tokenizer_and_a_third_tokenizer_evicts_the_first(
    tokenizer: object,
) -> None:
    from tokenizers import AddedToken

    cache = GrammarCache(tokenizers=2)
    vocabulary = _vocabulary(cache, tokenizer)
    assert _vocabulary(cache, tokenizer) is vocabulary  # same digest, built once
    cache.compiled(vocabulary, JsonOutput(SCHEMA))
    cache.compiled(vocabulary, JsonOutput(SCHEMA))
    assert (cache.stats().compiles, cache.stats().hits) == (1, 1)
    others = []
    for extra in ("<a>", "<b>"):
        other = build_tokenizer()
        other.add_tokens([AddedToken(extra, special=False)])
        others.append(_vocabulary(cache, other))
    assert len({v.key for v in [vocabulary, *others]}) == 3
    cache.compiled(vocabulary, JsonOutput(SCHEMA))
    assert cache.stats().compiles == 2  # its grammars went with it


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {}}, "if"),
    ],
)
def test_a_keyword_the_grammar_cannot_enforce_is_refused_by_name(
    tokenizer: object, schema: dict[str, object], keyword: str
) -> None:
    cache = GrammarCache()
    with pytest.raises(InvalidRequest, match=keyword):
        cache.compiled(_vocabulary(cache, tokenizer), JsonOutput(json.dumps(schema)))


@pytest.mark.parametrize(
    ("format", "text"),
    [
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": {"x": 3}}'),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 3}}]'),
    ],
)
@pytest.mark.parametrize("required", [True, False])
def test_each_family_constrains_its_calls(
    tokenizer: object, format: ToolCallFormat, text: str, required: bool
) -> None:
    cache = GrammarCache()
    constraint = ToolCallOutput(format, (("f", PARAMETERS),), required=required, parallel=False)
    matcher = cache.matcher(_vocabulary(cache, tokenizer), constraint)
    _follow(matcher, tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
    assert matcher.complete


def test_auto_allows_text_and_constrains_a_call_after_its_marker(tokenizer: object) -> None:
    cache = GrammarCache()
    constraint = ToolCallOutput("hermes", (("f", PARAMETERS),), required=False)
    matcher = cache.matcher(_vocabulary(cache, tokenizer), constraint)
    encode = tokenizer.encode  # type: ignore[attr-defined]
    _follow(matcher, encode("Some text, then <tool_call>", add_special_tokens=False))
    allowed = matcher.allowed()
    assert int(allowed.sum()) == 1  # the newline before the call's JSON, nothing else
    _follow(matcher, encode('\n{"name": "', add_special_tokens=False))
    assert not matcher.allowed()[encode("g", add_special_tokens=False)[0]]


@pytest.mark.parametrize(
    ("template", "family"),
    [
        (CHAT_TEMPLATE, "hermes"),
        ("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", "mistral"),
        ("{% if tools %}<|python_tag|>{% endif %}", "llama3_json"),
        ("{% if tools %}ipython parameters{% endif %}", "llama3_json"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        (None, None),
    ],
)
def test_the_family_is_detected_from_the_template(template: str | None, family: str | None) -> None:
    assert detect_tool_format(template) == family
