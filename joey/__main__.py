"""``python -m joey`` is the ``joey`` command."""

import sys

from joey.cli import main

sys.exit(main())
