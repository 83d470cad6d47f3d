"""`python -m monosemantic` is the `monosemantic` command."""

import sys

from .cli import main

sys.exit(main())
