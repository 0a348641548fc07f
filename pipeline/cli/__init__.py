"""Kiln's commands, one module per verb: `python -m pipeline <verb> --help`."""
