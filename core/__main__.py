"""``python -m core``: the command line (:mod:`core.cli.main`)."""
import sys

from core.cli.main import main

sys.exit(main())
