"""``python -m toolchain.cli`` is ``edgesmith``."""
from toolchain.cli import main

raise SystemExit(main())
