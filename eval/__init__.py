"""ecso.eval."""
