"""``python -m transfer_learning.serve key=value ...``: the same command as ``tl-serve``."""

from transfer_learning.cli.serve import main

raise SystemExit(main())
