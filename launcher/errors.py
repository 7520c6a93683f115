class ConfigError(Exception):
    """Bad input found before anything starts. `key` names the config key (or file) to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class TrainingStopped(Exception):
    """A rank stops the run for a reason it names (a NaN loss): logged as the rank's failure, without a traceback."""
