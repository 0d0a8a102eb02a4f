"""Base class of errors caused by user input (config, data, checkpoint, sizes).

Command-line entry points catch :class:`UserInputError` and print its message (which names the
file/field and the fix) instead of a traceback, exiting with status 2.
"""


class UserInputError(ValueError):
    """Bad input that the user can fix; the message says what and how."""
