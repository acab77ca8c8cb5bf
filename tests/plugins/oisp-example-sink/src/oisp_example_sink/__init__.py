"""An example third-party sink plugin for oisp, shipped as its own package through an entry point."""
