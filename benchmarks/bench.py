"""Speed of optlm against transformers and CTranslate2 (see optlm/benchmark.py); same as ``optlm bench``.

    python benchmarks/bench.py --markdown benchmarks/RESULTS.md
"""

import sys

from optlm.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
