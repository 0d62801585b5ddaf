import sys

from megamor.adapt.cli import main

sys.exit(main())
