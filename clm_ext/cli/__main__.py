"""`python -m clm_ext.cli ...` is the `clm` command."""
import sys

from . import main

sys.exit(main())
