"""One greedy chat request through the official `openai` client, as the demos send them:
the answer, and the `system_fingerprint` of every response that carried it (each chunk
of a stream, or the one reply), from which a demo reads the generations that served it."""

from __future__ import annotations

from typing import Any


def chat(
    client: Any, model: str, question: str, *, stream: bool, max_tokens: int
) -> tuple[str, list[str | None]]:
    """Ask `model` `question` greedily; the answer and the fingerprints seen. Raises what
    the client raises."""
    messages = [{"role": "user", "content": question}]
    if not stream:
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens
        )
        return reply.choices[0].message.content or "", [reply.system_fingerprint]
    parts: list[str] = []
    fingerprints: list[str | None] = []
    chunks = client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0, max_tokens=max_tokens
    )
    for chunk in chunks:
        fingerprints.append(chunk.system_fingerprint)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), fingerprints
