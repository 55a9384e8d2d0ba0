"""The `medctl` command line: one thin module per command, no logic of its own."""
