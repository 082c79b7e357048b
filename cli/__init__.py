"""ecso.cli."""
