"""`python -m atelier ...`: the same as the `atelier` command."""
import sys

from .cli.main import main

sys.exit(main())
