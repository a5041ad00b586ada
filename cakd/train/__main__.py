"""``python -m cakd.train``."""
import sys

from .trainer import main

sys.exit(main())
