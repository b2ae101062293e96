"""How charlm reads flags: one-line errors and a short --help, for LightningCLI's parser and the commands' own."""

import argparse
import re

from jsonargparse import ArgumentParser, DefaultHelpFormatter

from charlm.errors import FlagError


class OneLineErrors:
    """A parser whose bad flag or config is one line (a FlagError), not argparse's usage of every flag first."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying one type of a union: it handles the exception itself
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        # of a union's errors, the first (not the one for None) says what is wrong
        message = re.sub(
            r"Does not validate .*?Errors:\s*- (.*?)\s*- Expected a <class 'NoneType'>", r"\1,", message, flags=re.S
        )
        message = re.sub(r",? Given value type: <class '\w+'>", "", message)  # the value given says enough
        raise FlagError(f"{prog}: error: {' '.join(message.split())} ({prog} --help lists the flags)")


class Help(DefaultHelpFormatter):
    """--help a person reads in a terminal: a one-line usage, and Lightning's Trainer and ModelCheckpoint flags as
    one sentence and their default each (the whole text is in Lightning's docs); charlm's own flags in full."""

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        if prefix == "":  # argparse asking for the prog that a subcommand's own prog starts with
            return self._prog
        return f"usage: {self._prog.replace(' [options]', '')} [--config CONFIG] [--FLAG VALUE ...]\n\n"

    def _get_help_string(self, action) -> str:
        if (
            not action.dest.startswith(("trainer.", "checkpoint."))
            or action.dest == "checkpoint.save_last_every_n_steps"
        ):
            return super()._get_help_string(action)
        sentence = re.split(r"(?<=\.)\s", " ".join((action.help or "").split()), maxsplit=1)[0].replace("%", "%%")
        return sentence if action.default == argparse.SUPPRESS else f"{sentence} (default: %(default)s)"


class CommandParser(OneLineErrors, ArgumentParser):
    """The parser of a command that is a typed function (generate, attention, data, sweep)."""
