"""``python -m mmcl`` (and ``accelerate launch -m mmcl``) is the ``mmcl`` command."""

from mmcl.cli import main

raise SystemExit(main())
