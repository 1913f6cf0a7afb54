"""`trainctl`: the command line (`main` parses; one module per command or small group of commands)."""
