"""TorchServe handler: loads the directory named in the archive's model-config.yaml
(`handler: {model_dir, version}`) and answers `{"prompt", "max_tokens"}` with the
generated text and the version that produced it. A customized describe
(`GET /models/bench/N?customized=true`, which TorchServe queues behind the version's
pending requests) is answered with `{"version"}` and no generation."""

from __future__ import annotations

import json
from typing import Any

from textgen import Generator, parse  # type: ignore[import-not-found]  # beside it in the .mar

_generator: Any = None


def handle(data: Any, context: Any) -> list[Any] | None:
    global _generator
    if _generator is None:
        config = context.model_yaml_config["handler"]
        _generator = Generator(str(config["model_dir"]), str(config["version"]))
    if data is None:
        return None
    if context.get_request_header(0, "describe") == "True":
        return [json.dumps({"version": _generator.version})]
    answers = []
    for item in data:
        prompt, max_tokens = parse(item.get("body") or item.get("data"))
        answers.append(_generator.generate(prompt, max_tokens))
    return answers
