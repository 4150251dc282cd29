"""`python -m proxy` is the `indexguard` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
