"""The faces of lora-composer: the ``compose`` command and its subcommands, and the web UI.

The top layer: front ends import the library (pipeline, strategies, retriever, mini world); nothing in
the library imports them. The command table is :data:`lora_composer.frontends.cli.COMMANDS`; every
command follows :mod:`lora_composer.frontends.args` (one-line errors, exit code 2).
"""
