"""The one exception type users see.

Anything the user can fix (a bad file, a bad option, a missing download) raises CaptionerError with a
one-line message naming the culprit. The command-line entry points print it as `error: ...` and exit
non-zero instead of showing a traceback.
"""


class CaptionerError(Exception):
    """A problem with the user's input, stated in one line."""


class NonFiniteLoss(Exception):
    """Training produced a NaN or infinite loss; the training loop turns it into a CaptionerError."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step
