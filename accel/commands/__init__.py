"""One module per `accel` subcommand.

Each module defines ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``(args) -> int`` (the exit code). cli.py lists them.
"""
