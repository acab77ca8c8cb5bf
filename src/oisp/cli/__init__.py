"""The ``oisp`` command: a thin example runner composing the library. Nothing imports it."""
