"""`python -m grpo_stream.cli`: the same entry point as the `grpo-stream` command."""

from grpo_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
