"""The OpenAI-compatible `/v1` API."""
