from sparsetrace.cli import entry

entry()
