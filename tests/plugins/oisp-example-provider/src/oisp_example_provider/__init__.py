"""An example third-party provider plugin for oisp, shipped as its own package through an entry point."""
