import sys

from lmkiln.cli import main

sys.exit(main())
