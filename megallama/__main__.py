import sys

from megallama.cli import main

sys.exit(main())
