"""``mm bench``: mm against Hugging Face's Llama 3.2 Vision on the same weights, side by side."""

__all__: list[str] = []
