import sys

from megatron_klear.sft.trainer import main

sys.exit(main())
