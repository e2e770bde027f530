"""User-facing errors: one line that names the config key (or file) and what to do."""


class ConfigError(ValueError):
    """Bad input from the user. The CLI prints it as one line and exits non-zero before writing any result."""
