"""The web console at `/ui`: its page, shipped as package data, and what its Server view shows of the configuration."""
