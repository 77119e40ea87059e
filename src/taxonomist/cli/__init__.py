"""The `taxonomist` command line: one small module per verb. Nothing imports this package."""
