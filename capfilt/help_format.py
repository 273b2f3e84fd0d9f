"""One help style for every ``capfilt`` command: every default shown, unless the flag has none or says it."""

from __future__ import annotations

import argparse


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none (a switch) or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" or "default" in action.help:
            return action.help
        return super()._get_help_string(action)
