"""fedcore's benchmark suite: `python -m bench <name> [--quick] [--json PATH]`."""
