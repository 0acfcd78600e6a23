import sys

from megatron_klear.pipeline import rl_main

sys.exit(rl_main())
