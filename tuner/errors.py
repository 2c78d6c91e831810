"""One root exception for the tool; the subclasses encode the policy.

`UsageError` (and subclasses) stop a run with a one-line message that names the file, flag or
value and what to do; the CLI prints it without a traceback and exits 2. `TrialFailed` is
recorded by the search driver, which goes on with the next trial.
"""


class TunerError(Exception):
    """Root of every error this tool raises on purpose."""


class UsageError(TunerError):
    """Bad input or configuration: the user must change something."""


class DatasetError(UsageError):
    """The dataset folder cannot be used as it is (no images, too few classes, ...)."""


class WeightsError(UsageError):
    """Backbone weights cannot be found or loaded."""


class SpaceError(UsageError):
    """A search-space file is invalid."""


class TrialFailed(TunerError):
    """One trial could not finish; the search records it and continues."""
