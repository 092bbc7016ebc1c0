"""``python -m hetlora.runtime.flower``: see :mod:`hetlora.runtime.flower.tool`."""

import sys

from hetlora.runtime.flower.tool import main

sys.exit(main())
