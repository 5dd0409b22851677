"""Errors that reach the user as one line, without a traceback.

Anything a user can fix (a missing file, an unknown model id, a judge that does not answer) is
raised as :class:`UserError`; ``cli.py`` prints its message and exits with status 2.
"""


class UserError(ValueError):
    """A problem with the user's input or environment, with a message that says what to do."""
