"""Placeholder until the optim_step op lands."""
__all__: list[str] = []
