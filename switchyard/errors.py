"""The error every layer raises for bad input, kept below them all so that none imports another just for it."""


class ConfigError(ValueError):
    """A bad config or argument; its message is one line that names the fix."""
