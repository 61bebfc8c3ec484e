"""`python -m ciml.cli ...` (what `torchrun ... -m ciml.cli train` runs)."""

import sys

from ciml.cli import main

sys.exit(main())
