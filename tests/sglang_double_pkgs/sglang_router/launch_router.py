"""``python -m sglang_router.launch_router`` in the contract tests: the router double of tests/sglang_double.py."""

from tests.sglang_double import main

if __name__ == "__main__":
    main("router")
