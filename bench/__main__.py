"""`python -m bench`: the same as `ohlora bench`."""

import sys

from bench.cli import main

sys.exit(main())
