"""The `skeleton` subcommands that parse their own options: each module has main(argv, prog) -> exit code and
runs as `skeleton NAME` (flows/cli.py) or `python -m flows.commands.NAME`."""
