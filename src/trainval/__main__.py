import sys

from trainval.cli import main

sys.exit(main())
