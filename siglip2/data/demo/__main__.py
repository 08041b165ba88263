"""``python -m siglip2.data.demo``: see :mod:`.cli`."""

import sys

from .cli import main

sys.exit(main())
