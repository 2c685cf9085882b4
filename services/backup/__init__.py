"""Backups: sources (what is dumped), destinations (where it is kept), and the runner that ties
them to the catalog in the state store."""
