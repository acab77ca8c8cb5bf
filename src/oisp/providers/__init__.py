"""oisp's built-in provider plugins, registered through the same hooks third-party providers implement."""
