"""Placeholder until the topk op lands."""
__all__: list[str] = []
