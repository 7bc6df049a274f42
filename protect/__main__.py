import sys

from protect.cli import main

sys.exit(main())
