"""The one exception type for mistakes a user can fix (bad recipe, bad data, missing checkpoint).

The CLI prints its message on one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the file and line, or the recipe key."""


class TrainingStopped(UserError):
    """Training cannot usefully go on (e.g. non-finite losses again and again); the message names the step."""
