"""The one exception type users see.

Anything the user can fix (a bad file, a bad option, a missing download) raises CaptionerError with a
one-line message naming the culprit. The command-line entry points print it as `error: ...` and exit
non-zero instead of showing a traceback.
"""


class CaptionerError(Exception):
    """A problem with the user's input, stated in one line."""
