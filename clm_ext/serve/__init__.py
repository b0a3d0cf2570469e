"""`clm serve`: an OpenAI-compatible server in which every request turns its own alignment dial.

protocol (request bodies -> checked parameters) -> app (FastAPI routes, SSE) -> engine (transformers'
continuous batching) -> batch_hooks (a per-token alpha in the engine's packing order, per-request sampling).
"""
