"""``python -m service.vllm ...`` = ``tandem verifier ...`` (run it with the Python that has vLLM)."""

import sys

from service.vllm.launcher import main

sys.exit(main())
