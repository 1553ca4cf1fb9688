"""Integrations of fastattn with other libraries.

Each submodule imports its library lazily and registers nothing at import time:
`fastattn.integrations.transformers.register()` adds fastattn to Hugging Face transformers.
"""
