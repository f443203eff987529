"""Seldon MLServer runtime: loads `parameters.uri` of its model-settings.json and answers a
V2 inference request (inputs `prompt`, BYTES, and `max_tokens`, INT32) with the outputs
`text` and `version` (the benchmark's version, from `parameters.extra.bench_version`)."""

from __future__ import annotations

from typing import Any

from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.codecs import StringCodec  # type: ignore[import-not-found]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found]
from textgen import Generator  # type: ignore[import-not-found]  # beside it in the model dir


class BenchRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        parameters: Any = self.settings.parameters
        self._generator = Generator(str(parameters.uri), str(parameters.extra["bench_version"]))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {item.name: item for item in payload.inputs}
        prompt = StringCodec.decode_input(inputs["prompt"])[0]
        max_tokens = int(inputs["max_tokens"].data[0])
        answer = self._generator.generate(prompt, max_tokens)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                StringCodec.encode_output("text", [answer["text"]]),
                StringCodec.encode_output("version", [answer["version"]]),
            ],
        )
