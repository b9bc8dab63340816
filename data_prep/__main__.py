"""``python -m data_prep`` is ``mmcl-prep``."""

from data_prep.cli import main

raise SystemExit(main())
