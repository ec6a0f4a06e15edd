"""`python -m fedcore`: the same as the `fedcore` command."""

import sys

from fedcore.cli import main

sys.exit(main())
