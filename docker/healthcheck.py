"""Container healthcheck: exit 0 when GET URL answers 200 within 5 s, else 1.

    python /opt/tandem/docker/healthcheck.py [URL]

URL defaults to http://127.0.0.1:$TANDEM_PORT/health (TANDEM_PORT defaults to 8000).
Standard library only, so it runs in every image (no curl in slim images).
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('TANDEM_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
