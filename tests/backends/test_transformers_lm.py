"""Loading, checking, generating from and unloading real (tiny) transformers models."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.backends.loaded_lm import fallback_chat_prompt
from hotweights.demo.tinylm import build_model, build_tokenizer, save_pretrained
from hotweights.errors import InvalidRequest, ModelRetired, ValidationError
from hotweights.generation import GenerationParams
from tests.backends.stop_reference import first_stop_reference

pytestmark = pytest.mark.llm

PROMPT = "Hello"


def greedy(max_tokens: int = 24) -> GenerationParams:
    return GenerationParams(temperature=0.0, max_tokens=max_tokens)


def sampled(seed: int, max_tokens: int = 24, stop: Sequence[str] = ()) -> GenerationParams:
    return GenerationParams(temperature=1.0, max_tokens=max_tokens, seed=seed, stop=stop)


def reference_greedy_ids(model: LoadedLM, prompt: str, max_tokens: int) -> list[int]:
    """Greedy token ids from transformers' own `generate`, for comparison."""
    import torch

    ids = model.encode(prompt)
    transformers_model: Any = model.model  # `generate` comes from a mixin mypy cannot see
    with torch.inference_mode():
        output = transformers_model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False
        )
    return [int(token) for token in output[0, len(ids) :]]


def test_load_exposes_what_the_model_is(
    lively_lm: LoadedLM, lively_dir: Path, loader: TransformersLoader
) -> None:
    assert lively_lm.architecture == "Qwen3ForCausalLM"
    assert lively_lm.model_type == "qwen3"
    assert lively_lm.vocab_size == lively_lm.tokenizer_size == 261
    assert lively_lm.fingerprint == loader.fingerprint(str(lively_dir))
    assert (lively_lm.device, lively_lm.dtype) == ("cpu", "float32")
    assert not lively_lm.model.training
    assert not lively_lm.unloaded


def test_greedy_text_matches_transformers_generate(lively_lm: LoadedLM) -> None:
    ids = reference_greedy_ids(lively_lm, PROMPT, 24)
    assert lively_lm.tokenizer.eos_token_id not in ids  # so all 24 tokens are text
    expected = lively_lm.tokenizer.decode(ids, skip_special_tokens=True)
    first = lively_lm.generate(PROMPT, greedy(24))
    assert first.text == expected
    assert (first.finish_reason, first.completion_tokens) == ("length", 24)
    assert first.prompt_tokens == lively_lm.count_tokens(PROMPT) == len(PROMPT)
    assert lively_lm.generate(PROMPT, greedy(24)) == first


def test_same_seed_same_text_other_seed_other_text(lively_lm: LoadedLM) -> None:
    first = lively_lm.generate(PROMPT, sampled(seed=7))
    assert lively_lm.generate(PROMPT, sampled(seed=7)) == first
    assert lively_lm.generate(PROMPT, sampled(seed=8)).text != first.text
    assert first.text != lively_lm.generate(PROMPT, greedy()).text


def test_concurrent_requests_keep_their_own_random_state(lively_lm: LoadedLM) -> None:
    seeds = [1, 2, 1, 2]
    alone = {seed: lively_lm.generate(PROMPT, sampled(seed)).text for seed in set(seeds)}
    barrier = threading.Barrier(len(seeds))
    results: dict[int, str] = {}

    def run(index: int, seed: int) -> None:
        barrier.wait()
        results[index] = lively_lm.generate(PROMPT, sampled(seed)).text

    threads = [threading.Thread(target=run, args=item) for item in enumerate(seeds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[index] for index in range(len(seeds))] == [alone[s] for s in seeds]


def test_a_tiny_nucleus_is_greedy(lively_lm: LoadedLM) -> None:
    nucleus = GenerationParams(temperature=1.0, top_p=1e-6, max_tokens=24, seed=3)
    assert lively_lm.generate(PROMPT, nucleus).text == lively_lm.generate(PROMPT, greedy()).text


def test_max_tokens_ends_with_length(lively_lm: LoadedLM) -> None:
    for max_tokens in (1, 5):
        completion = lively_lm.generate(PROMPT, greedy(max_tokens))
        assert (completion.finish_reason, completion.completion_tokens) == ("length", max_tokens)


def test_stream_pieces_add_up_to_the_completion(lively_lm: LoadedLM) -> None:
    params = sampled(seed=5, max_tokens=30)
    chunks = list(lively_lm.stream(PROMPT, params))
    *pieces, last = chunks
    assert all(chunk.text and chunk.finish_reason is None for chunk in pieces)
    assert last.finish_reason == "length"
    assert last.completion_tokens == 30
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts)
    completion = lively_lm.generate(PROMPT, params)
    assert "".join(chunk.text for chunk in chunks) == completion.text
    assert (last.prompt_tokens, last.completion_tokens) == (
        completion.prompt_tokens,
        completion.completion_tokens,
    )


def test_stop_strings_cut_the_text_before_the_first_one(lively_lm: LoadedLM) -> None:
    full = lively_lm.generate(PROMPT, sampled(seed=11, max_tokens=40)).text
    assert len(full) >= 16
    late, early = full[12:15], full[6:8]
    params = sampled(seed=11, max_tokens=40, stop=[late, early])
    expected, hit = first_stop_reference(full, [late, early])
    assert hit
    completion = lively_lm.generate(PROMPT, params)
    assert (completion.text, completion.finish_reason) == (expected, "stop")
    assert completion.completion_tokens < 40
    sent = ""
    for chunk in lively_lm.stream(PROMPT, params):
        sent += chunk.text
        assert expected.startswith(sent)  # no piece of a stop string is ever streamed
    assert sent == expected


def test_the_eos_token_ends_the_completion(lively_lm: LoadedLM, tmp_path: Path) -> None:
    ids = reference_greedy_ids(lively_lm, PROMPT, 4)
    root = Path(shutil.copytree(lively_lm.source, tmp_path / "model"))
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((root / name).read_text())
        settings["eos_token_id"] = ids[3]  # the fourth greedy token now ends the text
        (root / name).write_text(json.dumps(settings))
    loader = TransformersLoader()
    model = loader.load(str(root))
    try:
        completion = model.generate(PROMPT, greedy(24))
    finally:
        loader.unload(model)
    expected = lively_lm.tokenizer.decode(ids[:3], skip_special_tokens=True)
    assert ids[3] not in ids[:3]
    assert (completion.text, completion.finish_reason) == (expected, "stop")
    assert completion.completion_tokens == 4


def test_generation_stops_at_the_models_last_position(lively_lm: LoadedLM) -> None:
    limit = lively_lm.max_positions
    assert limit == 512
    completion = lively_lm.generate("a" * (limit - 2), greedy(10))
    assert (completion.finish_reason, completion.completion_tokens) == ("length", 2)
    with pytest.raises(InvalidRequest, match="at most 512 positions"):
        lively_lm.stream("a" * limit, greedy())
    with pytest.raises(InvalidRequest, match="empty"):
        lively_lm.stream("", greedy())


def test_chat_template_and_token_counts(lively_lm: LoadedLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hé"}]
    prompt = lively_lm.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhé<|im_end|>\n<|im_start|>assistant\n"
    )
    assert lively_lm.count_tokens("hé") == 3  # byte-level: é is two bytes
    assert lively_lm.count_tokens("<|im_start|>") == 1
    assert fallback_chat_prompt(messages) == "system: Be brief.\nuser: hé\nassistant:"


def test_a_tokenizer_without_template_gets_the_fallback(fresh_lm: LoadedLM) -> None:
    fresh_lm.tokenizer.chat_template = None
    messages = [{"role": "user", "content": "hi"}]
    assert fresh_lm.apply_chat_template(messages) == "user: hi\nassistant:"


def test_a_template_that_refuses_the_messages_is_an_invalid_request(fresh_lm: LoadedLM) -> None:
    fresh_lm.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        fresh_lm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unload_frees_the_model_and_later_use_is_retired(
    fresh_lm: LoadedLM, loader: TransformersLoader
) -> None:
    loader.validate(fresh_lm)
    loader.warmup(fresh_lm)
    weights = weakref.ref(fresh_lm.model)
    suspended = fresh_lm.stream(PROMPT, greedy(24))
    next(suspended)  # a stream in progress holds its cache, not the model
    loader.unload(fresh_lm)
    gc.collect()
    assert weights() is None
    assert fresh_lm.unloaded
    with pytest.raises(ModelRetired, match="was unloaded"):
        next(suspended)
    with pytest.raises(ModelRetired):
        fresh_lm.stream(PROMPT, greedy())
    with pytest.raises(ModelRetired):
        fresh_lm.count_tokens("x")
    loader.unload(fresh_lm)  # a second unload changes nothing


def test_validate_refuses_a_tokenizer_larger_than_the_embedding(
    tmp_path: Path, loader: TransformersLoader
) -> None:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    tokenizer.add_tokens([f"<extra_{index}>" for index in range(5)])
    root = save_pretrained(tmp_path / "model", model, tokenizer)
    loaded = loader.load(str(root))
    try:
        with pytest.raises(ValidationError, match=r"266 tokens .* only 261 rows"):
            loader.validate(loaded)
    finally:
        loader.unload(loaded)


def test_validate_refuses_non_finite_logits(tmp_path: Path, loader: TransformersLoader) -> None:
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    root = save_pretrained(tmp_path / "model", model, tokenizer)
    loaded = loader.load(str(root))
    try:
        with pytest.raises(ValidationError, match="non-finite logits"):
            loader.validate(loaded)
    finally:
        loader.unload(loaded)


def test_importing_the_backends_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, hotweights.backends, hotweights.core; "
        "sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) or None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cuda_load_generate_and_unload_return_the_memory(lively_dir: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    before = torch.cuda.memory_allocated()
    loader = TransformersLoader(device="cuda", dtype="bfloat16")
    model = loader.load(str(lively_dir))
    weights = torch.cuda.memory_allocated() - before
    assert weights >= sum(p.numel() * 2 for p in model.model.parameters())
    assert next(model.model.parameters()).is_cuda
    loader.validate(model)
    params = GenerationParams(temperature=1.0, max_tokens=8, seed=4)
    first = model.generate(PROMPT, params)
    assert model.generate(PROMPT, params) == first
    busy = torch.cuda.memory_allocated()
    loader.unload(model)
    # cuBLAS workspaces may stay allocated; the weights must not.
    assert busy - torch.cuda.memory_allocated() >= weights


def test_a_new_architecture_is_allowed_but_logged(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:

    loader = TransformersLoader()
    first = loader.load(str(tiny_dir))
    loader.validate(first)
    other = Path(shutil.copytree(tiny_dir, tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["RenamedForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    second = loader.load(str(other))
    with caplog.at_level("WARNING", logger="hotweights.backends"):
        loader.validate(second)
    assert "architecture changes from Qwen3ForCausalLM to RenamedForCausalLM" in caplog.text
    loader.unload(first)
    loader.unload(second)
