"""`flexigpt` subcommands, one module each (see flexigpt_kernels/cli.py)."""
