"""Errors that reach the user as one line, without a traceback.

Anything a user can fix (a missing file, an unknown model id, a judge that does not answer) is
raised as :class:`UserError`; ``cli.py`` prints its message and exits with status 2.
"""

import re


class UserError(ValueError):
    """A problem with the user's input or environment, with a message that says what to do."""


def describe_config_error(message: str) -> str:
    """One line from jsonargparse's nested report: the dotted key and the innermost problem."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    detail_pattern = r"(is not accepted|Got value|unrecognized arguments|No module named|does not exist|Unable to|not found)"
    details = [line.strip(" -") for line in message.splitlines() if re.search(detail_pattern, line)]
    detail = details[0] if details else message.strip().splitlines()[0]
    field = ".".join(k for k in keys if k != "init_args")
    return f"{field}: {detail}" if field else detail
