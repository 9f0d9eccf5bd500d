"""``python -m training``: fetch data, train presets, list them, summarise runs."""

from training.cli import main

raise SystemExit(main())
