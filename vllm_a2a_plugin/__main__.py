"""``python -m vllm_a2a_plugin``: the ``vllm-a2a`` command (see :mod:`vllm_a2a_plugin.cli`)."""

import sys

from vllm_a2a_plugin.cli import main

sys.exit(main())
