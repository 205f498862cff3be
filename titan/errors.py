"""The one error type for bad input. Its own module, free of torch, so that light tools (scripts/prepare_data.py's
worker processes, which only tokenize) import titan without paying for torch."""


class ConfigError(ValueError):
    """A bad key, value, file or combination; the message names the key or file and fits on one line."""
