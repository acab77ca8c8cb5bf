"""The embedded default main job: a local provider endpoint that answers like OpenAI and Anthropic, so the
whole pipeline can be shown offline (``oisp demo``)."""
