"""``python -m oisp.decoder_process --fd N``: the decoder process (started by :class:`DecoderProcess`)."""

import sys

from oisp.decoder_process.worker import main

sys.exit(main())
