"""The OpenAI-compatible HTTP server (``distgen serve``)."""
