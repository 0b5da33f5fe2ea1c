"""`python -m serve.cli`: the `loraplex` command."""

from serve.cli.main import main

main()
