"""Entry point of ``python -m adapters.pg_embedded``; the command line itself is in ``cli``.

Imports: stdlib, adapters.pg_embedded.cli. The package's ``__init__`` re-exports ``main`` from
``cli``, not from here: had it imported this module, ``python -m`` would find it already loaded and
warn before running it again.
"""

from __future__ import annotations

import sys

from adapters.pg_embedded.cli import main

if __name__ == "__main__":
    sys.exit(main())
