"""``python -m sinkscope`` is the ``sinkscope`` command."""

import sys

from .cli import main

sys.exit(main())
