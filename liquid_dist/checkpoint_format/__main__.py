"""``python -m liquid_dist.checkpoint_format verify PATH`` (integrity.main)."""

import sys

from liquid_dist.checkpoint_format.integrity import main

sys.exit(main())
