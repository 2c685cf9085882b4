"""Figures of how hard components are working (`/ops status`): one source per component type."""
