"""Command-line interface: thin commands that turn arguments into one library call each."""
