"""``python -m yarn_rope.cli``."""

import sys

from . import main

sys.exit(main())
