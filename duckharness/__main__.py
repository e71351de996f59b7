import sys

from duckharness.cli import main

sys.exit(main())
