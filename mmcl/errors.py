"""Errors that mean "the user must change something": the CLI prints them without a traceback."""


class MmclError(Exception):
    """A problem with the user's input (config, data, paths) and a message saying what to fix."""


class ConfigError(MmclError):
    """A recipe key is unknown, missing, of the wrong type or out of range."""


class DataError(MmclError):
    """Shards or samples are missing, empty or lack a field the recipe needs."""
