"""Serving a saved model: the OpenAI-compatible server (``mm serve``), spoken answers, the ``/demo``
page, and ``mm ask``."""

__all__: list[str] = []
