"""MkDocs hook: the command-line reference, generated at build time from the commands' real parsers.

A page writes ``<!-- cli: train -->`` (or study, aggregate, compare, verify) where the options of
``python -m hvd_sparse.<command>`` go; this hook replaces the marker with the command's usage line and
a table per argument group (option, default, what it does), taken from the argparse parser the command
itself builds. Nothing is copied by hand, so the page cannot drift from ``--help``. A marker naming an
unknown command fails the build.

The parsers are built by the commands' own functions (``hvd_sparse.cli.parse_config`` for train, each
module's ``parse_args`` otherwise), with ``parse_args`` intercepted so that nothing is parsed or run.
``tests/test_docs.py`` imports this file to check that the page covers every option.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
from typing import Iterator

COMMANDS = ("train", "study", "aggregate", "compare", "verify")
MARKER = re.compile(r"<!--\s*cli:\s*([\w-]+)\s*-->")


class _Captured(BaseException):  # a BaseException: the commands' own error handling lets it through
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


@contextlib.contextmanager
def _capturing() -> Iterator[None]:
    from hvd_sparse import cli

    original = cli.ArgumentParser.parse_args

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> argparse.Namespace:
        raise _Captured(self)

    cli.ArgumentParser.parse_args = grab  # type: ignore[method-assign]
    try:
        yield
    finally:
        cli.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser ``python -m hvd_sparse.<command>`` builds (train's with the registries' names, as its
    ``main`` passes them)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r} in a <!-- cli: ... --> marker; known: {', '.join(COMMANDS)}")
    with _capturing():
        try:
            if command == "train":
                from hvd_sparse import cli, train
                from hvd_sparse.data import DATASETS
                from hvd_sparse.models import MODELS
                from hvd_sparse.optim import OPTIMIZERS
                from hvd_sparse.pruning import PRUNING

                names = {"dataset": list(DATASETS), "model": list(MODELS), "optimizer": list(OPTIMIZERS),
                         "prune_method": list(PRUNING)}
                cli.parse_config([], train.PROG, train.__doc__.splitlines()[0], lambda: names)
            else:
                importlib.import_module(f"hvd_sparse.{command}").parse_args([])
        except _Captured as captured:
            return captured.parser
    raise RuntimeError(f"hvd_sparse.{command} built no parser")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string (``--lr``, ``--no-capping``, ...) and positional name of the parser, help excluded."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        found += list(action.option_strings) or [action.metavar or action.dest]
    return found


def _cell(text: str) -> str:
    """Plain help text as one Markdown table cell (no HTML, no emphasis, no column break)."""
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("*", "\\*")):
        text = text.replace(raw, escaped)
    return text.replace("\n", " ").strip()


def _default(action: argparse.Action) -> str:
    if not action.option_strings or action.default in (None, argparse.SUPPRESS, [], ""):
        return ""
    if action.default is False and not isinstance(action, argparse.BooleanOptionalAction):
        return ""  # a plain flag: off unless given
    return f"`{action.default}`"


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"`{name}`" + (" ..." if action.nargs in ("+", "*") else "")
    if action.nargs == 0:  # flags: store_true, BooleanOptionalAction (both spellings listed)
        return ", ".join(f"`{s}`" for s in action.option_strings)
    metavar = action.metavar or action.dest.split(".")[-1].upper()
    if action.choices:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return ", ".join(f"`{s} {metavar}`" for s in action.option_strings)


def render(command: str) -> str:
    """Markdown for one command: its usage and a table per argument group."""
    parser = parser_of(command)
    formatter = parser._get_formatter()
    lines = ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title or "", group.title)
        lines += [f"**{title}**", "", "| option | default | what it does |", "|---|---|---|"]
        for action in actions:
            help_text = formatter._expand_help(action) if action.help else ""
            lines.append(f"| {_option(action)} | {_default(action)} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
