import sys

from jaxcov.cli import main

sys.exit(main())
