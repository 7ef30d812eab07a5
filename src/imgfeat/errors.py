"""The two kinds of failure imgfeat distinguishes.

`UsageError` is a user's mistake (bad argument, missing file, unknown model): the command line
prints its message on one line and exits non-zero, with no traceback.
`ImageError` is one image that cannot be used: it becomes an error record and the run goes on.
"""


class ImgfeatError(Exception):
    """Base class of the errors imgfeat raises on purpose."""


class UsageError(ImgfeatError):
    """A mistake in what the user asked for; the message says how to fix it."""


class ImageError(ImgfeatError):
    """One image that cannot be read or decoded; the message is the recorded reason."""
