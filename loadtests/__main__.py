"""``python -m loadtests ...``: the load generator (see loadtests/load.py)."""

import sys

from loadtests.load import main

sys.exit(main())
