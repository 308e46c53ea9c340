"""`python -m fastcache ...`: the `fastcache` command."""

import sys

from ._cli import main

sys.exit(main())
