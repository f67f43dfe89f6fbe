"""The product's own refusals. Every program prints one of them as one line (cli.reports_errors).

A UserError is something the user can fix: a flag, a file, a run directory, a data set. It is a
ValueError, so code that catches ValueError still catches it; any other exception is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """Bad input, named in one line: what is wrong and, where it helps, what to do."""
