"""What the commands share: argument parsing, messages, logging set-up, and the exit codes.

Each failure a user can meet ends as one line on every rank: 2 for input the user must fix
(configuration, data, logs), 1 for runtime failures (storage, other ranks), 0 after a stop signal
(the trial checkpointed: a scheduler may requeue the job, and the same command resumes it).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TextIO

from hvd_sparse import settings
from hvd_sparse.config import Config, ConfigError, add_config_arguments, config_from_namespace

if TYPE_CHECKING:
    from hvd_sparse.engine import Interrupted


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise ConfigError (reported by ``guarded`` as one line), no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see --help)")


PLUGIN_HELP = ("a module name or a .py file that registers models, datasets, pruning methods or measurements "
               "(hvd_sparse.register_model, register_dataset, register_pruning, register_measurement; docs/extending.md); "
               "imported on every rank before any name is looked up; repeatable")


def take_plugins(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(the ``--plugin`` values, the other arguments): plug-ins are imported before the parser is built,
    so that its help lists the names they register."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return known.plugin, rest


def parse_config(argv: Sequence[str] | None, prog: str, description: str,
                 names: Callable[[], Mapping[str, Sequence[str]]] | None = None) -> Config:
    """Parse argv into a validated Config (one ``--field-name`` per config field), after importing the
    ``--plugin`` modules (``names``: the registries' names, asked once they are loaded); any problem
    raises ConfigError with a one-line message."""
    from hvd_sparse.registry import load_plugins

    plugins, rest = take_plugins(argv)
    load_plugins(plugins)
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--plugin", metavar="MODULE_OR_FILE", help=PLUGIN_HELP)
    add_config_arguments(parser, names=names() if names else None)
    return config_from_namespace(parser.parse_args(rest))


def say(text: str, stream: TextIO | None = None) -> None:
    """Whole lines in one write: launchers tag and interleave ranks' output per write() chunk."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def configure_logging(level: str, is_root: bool) -> None:
    """``level`` on rank 0, warnings only elsewhere (call after ``dist.init``)."""
    logging.basicConfig(
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        level=getattr(logging, level.upper()) if is_root else logging.WARNING,
        force=True,
    )


ERROR_CHARACTERS = 2000  # a value quoted in a message (a huge list in a spec) is cut, not printed whole


def error_line(error: Exception, prog: str) -> None:
    text = str(error)
    if len(text) > ERROR_CHARACTERS:
        text = f"{text[:ERROR_CHARACTERS]} ... ({len(text) - ERROR_CHARACTERS} more characters)"
    say(f"{prog}: error: {text}", sys.stderr)


# The distributed commands' part below imports the engine and Horovod when called, not when this
# module is imported: the aggregator parses its arguments with this module and needs neither.


def fail(error: Exception, code: int, prog: str) -> int:
    """One error line on this rank; every rank that fails together leaves together."""
    from hvd_sparse import dist

    error_line(error, prog)
    dist.exit_barrier()
    return dist.leave_failed(code)


def report_interrupted(error: Interrupted) -> int:
    """Rank 0 says so; and where the launcher asked (launch/srun-resumable sets
    HVD_SPARSE_INTERRUPTED_FILE), it leaves that file, so the job is requeued only if the ranks
    really stopped and checkpointed (not when a late signal met a trial that ended anyway)."""
    from hvd_sparse import dist

    if dist.is_root():
        say(f"INTERRUPTED: {error}")
        marker = os.environ.get("HVD_SPARSE_INTERRUPTED_FILE")
        if marker:
            Path(marker).write_text(f"{error}\n")
    return 0


def guarded(body: Callable[[], int], prog: str) -> int:
    """A distributed command's body with the stop handlers installed, and its exit code: each failure
    one line."""
    from hvd_sparse import dist
    from hvd_sparse.engine import Interrupted, install_stop_handlers
    from hvd_sparse.log import StorageError

    dist.program = prog
    try:
        settings.check()  # the environment's values, before anything reads them
        install_stop_handlers(prog)
        code = body()
    except Interrupted as e:
        code = report_interrupted(e)
    except ValueError as e:  # ConfigError, DataError, LogError, unknown registry names
        return fail(e, 2, prog)
    except (dist.DistributedError, StorageError) as e:
        return fail(e, 1, prog)
    except dist.PeerFailure:
        return fail(RuntimeError(dist.PEER_FAILURE_MESSAGE), 1, prog)
    except Exception:  # a bug: its traceback, and in a packed job an exit that does not hang (dist.leave_failed)
        traceback.print_exc()
        return dist.leave_failed(1)
    dist.finish()
    return dist.leave(code)
