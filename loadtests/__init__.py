"""Load generation, benchmarks and the routing simulator."""
