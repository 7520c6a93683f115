class ConfigError(Exception):
    """Bad input found before anything starts. `key` names the config key (or file) to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
