"""python -m gptoss_hpc.bench {submit,train,status,mxfp4,serve,long_check} [args...]

python -m gptoss_hpc.bench submit --points 64      # compose + validate + submit a held 64-point sweep
python -m gptoss_hpc.bench train model=gpt_oss_20b # training tok/s on the GPU (docs/BENCHMARKS.md)
python -m gptoss_hpc.bench status --jobs 500       # status over a 500-job launch
python -m gptoss_hpc.bench mxfp4                   # MXFP4-resident experts vs bf16: loss, LoRA grads, memory
python -m gptoss_hpc.bench serve --model DIR       # serve load: 1/8/32/64 clients, tok/s, TTFT, latency, errors
python -m gptoss_hpc.bench long_check             # long-range attention vs an exact reference (issue 27)
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "submit": "gptoss_hpc.bench.submit",
    "train": "gptoss_hpc.bench.train",
    "status": "gptoss_hpc.bench.status",
    "mxfp4": "gptoss_hpc.bench.mxfp4_check",
    "serve": "gptoss_hpc.bench.serve",
    "long_check": "gptoss_hpc.bench.long_check",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(__doc__, file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
