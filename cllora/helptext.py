"""Help text of cllora's command lines: every option with its default, examples kept as written.

Usage::

    import argparse
    from cllora.helptext import HelpFormatter, examples

    p = argparse.ArgumentParser(prog="demo", formatter_class=HelpFormatter,
                                epilog=examples("demo --n 3", "demo --sizes 8,16"))
    p.add_argument("--n", type=int, default=2, help="how many")
    p.add_argument("--sizes", default=[4, 8], help="comma-separated sizes")
    p.format_help()   # "--n N  how many (default: 2)", "--sizes SIZES ... (default: 4,8)",
                      # then "examples:" and each command on its own line

Decision: an option that takes a value shows its default, appended as ``(default: ...)`` unless
its help already says what its default is (``default:`` in it: an option whose default is
computed, e.g. "default: the config's clients"); a list default is shown as it is typed
(``256,512``). A flag (no value) is off unless given and shows no default. The description and
the epilog keep their line breaks (argparse's ``RawDescriptionHelpFormatter``), so examples
stay one per line.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw description and epilog; ``(default: ...)`` after every option that takes a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or action.nargs == 0
            or default is None
            or default is argparse.SUPPRESS
            or "default:" in text
        ):
            return text
        if isinstance(default, list | tuple):
            default = ",".join(str(d) for d in default)
        shown = str(default) if default != "" else '""'
        return f"{text} (default: {shown.replace('%', '%%')})"


def examples(*commands: str) -> str:
    """The epilog of a command: ``examples:`` and one indented command per line."""
    return "examples:\n" + "\n".join(f"  {c}" for c in commands)
