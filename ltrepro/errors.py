"""The one exception type that the CLI turns into a single-line error and a non-zero exit."""


class LtreproError(Exception):
    """A user-facing error: bad config, data, checkpoint or request.

    The message names the offending file, key or value and says what is allowed, so the CLI
    can print it on one line instead of a traceback from deep inside torch.
    """


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): a foreign error, such as a
    store's or a driver's, told in one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


class RunStopped(Exception):
    """A run stopped on purpose before its last epoch (an Optuna trial pruned): its MLflow run
    ends KILLED, not FAILED."""
