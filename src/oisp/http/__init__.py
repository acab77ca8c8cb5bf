"""Sans-io HTTP: the :class:`HttpExchange` model and passive HTTP/1.1 and HTTP/2 decoders."""
