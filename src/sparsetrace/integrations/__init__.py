"""Callbacks that put a :class:`sparsetrace.Recorder` into other people's trainers.

- :mod:`.huggingface`: ``transformers.Trainer`` (``attach(trainer)`` or ``SparsityCallback``);
- :mod:`.lightning`: Lightning's ``Trainer`` (``SparsityCallback``).

Each imports its framework only when used (``pip install 'sparsetrace[integrations]'``).
"""
