"""``python -m sdserve.drill``: the drill without the rest of the CLI."""

from __future__ import annotations

import sys

from sdserve.drill.cli import main

sys.exit(main())
