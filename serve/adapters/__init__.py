"""Adapters as data: where they come from (sources), what makes one acceptable (validation)."""
