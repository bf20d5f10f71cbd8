import sys

from ops.faults.suite import main

sys.exit(main())
