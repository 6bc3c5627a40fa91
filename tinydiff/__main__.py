"""`python -m tinydiff ...` is the `tinydiff` command (see tinydiff/cli.py)."""
import sys

from tinydiff.cli import main

sys.exit(main())
