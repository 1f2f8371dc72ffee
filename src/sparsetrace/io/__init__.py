"""Reading and writing files that sparsetrace exchanges with other tools."""
