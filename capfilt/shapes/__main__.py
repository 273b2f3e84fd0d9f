"""``python -m capfilt.shapes …``"""

import sys

from capfilt.shapes.cli import main

sys.exit(main())
