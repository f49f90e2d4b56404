"""Named, typed recipes, one module per method (`onestep.presets.dmd2`, ...): each exposes PRESETS (name ->
Preset), DEFAULT_PRESET (the bundled CPU default) and OUTPUT_DIR."""
