"""Serving trained models: ``llm-trainer serve`` (an OpenAI-compatible HTTP server with continuous batching, a
reward-scoring endpoint and a web chat page) and ``llm-trainer chat`` (a terminal chat). See ``docs/serve.md``."""
