import sys

from diffcirc.cli import main

sys.exit(main())
