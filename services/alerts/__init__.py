"""Alerts: rules from the inventory, their evaluation against probes and /metrics, and alert state."""
