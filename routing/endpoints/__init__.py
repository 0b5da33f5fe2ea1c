"""The router's HTTP endpoints, one module per family."""
