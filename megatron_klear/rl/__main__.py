import sys

from megatron_klear.rl.trainer import main

sys.exit(main())
