"""``python -m sglang.launch_server`` in the contract tests: the server double of tests/sglang_double.py."""

from tests.sglang_double import main

if __name__ == "__main__":
    main("server")
