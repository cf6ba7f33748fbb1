"""``python -m loadtests ...``: the load generator (see loadtests/load/)."""

import sys

from loadtests.load import main

sys.exit(main())
