"""The engine: one batched generator per resident version (continuous batching).

`BatchEngine` steps every request of one `LoadedLM` together on its own thread, over
its cache rows (`KVRows`). `BatchingLoader` wraps the transformers loader so that a
version's engine starts at warmup, beside the live one, and stops before its unload.
"""
