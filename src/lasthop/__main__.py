import sys

from lasthop._entry import main

sys.exit(main())
