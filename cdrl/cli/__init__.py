"""The command-line wing: argument parsing and the one exception -> exit code 2 mapping. Nothing in
``cdrl`` imports it."""
