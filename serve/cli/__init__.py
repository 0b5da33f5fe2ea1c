"""The `loraplex` command (`serve.cli.main`): `prepare`, `serve`, and the commands that manage a running server, its
keys and adapters, and check what it serves (`serve.cli.manage`, `serve.cli.verify`); not part of the runtime."""
