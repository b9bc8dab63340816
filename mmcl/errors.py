"""Errors that mean "the user must change something": the CLI prints them without a traceback."""


class MmclError(Exception):
    """A problem with the user's input (config, data, paths) and a message saying what to fix."""


class ConfigError(MmclError):
    """A recipe key is unknown, missing, of the wrong type or out of range."""


class DataError(MmclError):
    """Shards or samples are missing, empty or lack a field the recipe needs."""


class Stopped(MmclError):
    """Training stopped on a signal (a scheduler's SIGTERM before preemption or at a time limit)
    after writing a checkpoint; ``exit_code`` is the shell's for that signal (143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def user_message(e: BaseException) -> str:
    """The message to show; errors re-raised from DataLoader workers carry a traceback to drop."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def run_cli(fn, *args) -> int:  # noqa: ANN001
    """Run a command's body: user mistakes print ``error: ...`` and exit 2, Ctrl-C exits 130."""
    import sys

    try:
        return fn(*args)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except MmclError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (completed shards and checkpoints are whole; rerun or --resume latest)", file=sys.stderr)
        return 130
