import sys

from umt5_fast.cli import main

sys.exit(main())
