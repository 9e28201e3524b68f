import sys

from lasthop.cli import main

sys.exit(main())
