"""Serving a checkpoint over an OpenAI-compatible API, re-scoring through it, chatting with it."""
