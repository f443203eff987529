"""TorchServe handler: loads the directory named in the archive's model-config.yaml
(`handler: {model_dir, version}`) and answers `{"prompt", "max_tokens"}` with the
generated text and the version that produced it."""

from __future__ import annotations

from typing import Any

from textgen import Generator, parse  # type: ignore[import-not-found]  # beside it in the .mar

_generator: Any = None


def handle(data: Any, context: Any) -> list[dict[str, Any]] | None:
    global _generator
    if _generator is None:
        config = context.model_yaml_config["handler"]
        _generator = Generator(str(config["model_dir"]), str(config["version"]))
    if data is None:
        return None
    answers = []
    for item in data:
        prompt, max_tokens = parse(item.get("body") or item.get("data"))
        answers.append(_generator.generate(prompt, max_tokens))
    return answers
