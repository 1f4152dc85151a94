"""Placeholder until the masked_linear op lands."""
__all__: list[str] = []
