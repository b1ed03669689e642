"""``python -m pipelines.site_cv``: see :mod:`pipelines.site_cv.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
