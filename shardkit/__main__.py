"""``python -m shardkit``: the same as the ``shardkit`` command."""

import sys

from shardkit.cli import main

sys.exit(main())
