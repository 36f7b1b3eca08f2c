"""``mm demo``: the whole recipe in miniature on generated data, offline, on a CPU."""

__all__: list[str] = []
