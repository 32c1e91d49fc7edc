"""``python -m vmmig`` runs the command line."""

from __future__ import annotations

import sys

from vmmig.cli import main


sys.exit(main())
