"""Runnable recipes built from the library's components: ``mmpo quickstart`` and ``mmpo mia-demo``."""
