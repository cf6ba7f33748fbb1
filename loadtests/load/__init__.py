"""The load generator (split into modules in the next commit)."""

from loadtests.load.report import *  # noqa: F401,F403
from loadtests.load.report import __doc__  # noqa: F401
