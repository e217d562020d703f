"""`python -m chatforge ...` is `chatforge ...`."""

import sys

from chatforge.cli import main

sys.exit(main())
