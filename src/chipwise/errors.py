"""The one exception type a user sees as a one-line message (exit code 2), never a traceback."""


class ChipwiseError(Exception):
    """Bad input from the user: config, data, checkpoint or command line.

    The message is one line that says what is wrong and how to fix it.
    """


class ConfigError(ChipwiseError):
    pass


class DataError(ChipwiseError):
    pass


class TrainingStopped(Exception):
    """The run stopped early on purpose, its state saved: preemption, or divergence it could not roll back from.

    Not a ChipwiseError: the input was fine. The command prints the one-line message and exits with `exit_code`
    (see docs/reliability.md for the codes), so a scheduler can tell a preempted run from a failed one.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
