"""`python -m bidirlm_jax.cli`: the `bidirlm` command."""

import sys

from bidirlm_jax.cli import main

sys.exit(main())
