"""The one exception type a user sees as a one-line message (exit code 2), never a traceback."""


class ChipwiseError(Exception):
    """Bad input from the user: config, data, checkpoint or command line.

    The message is one line that says what is wrong and how to fix it.
    """


class ConfigError(ChipwiseError):
    pass


class DataError(ChipwiseError):
    pass
