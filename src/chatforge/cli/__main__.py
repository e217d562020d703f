import sys

from chatforge.cli import main

sys.exit(main())
