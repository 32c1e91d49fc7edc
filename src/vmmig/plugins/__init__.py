"""Built-in plugins: one package per technology, plus observers."""
