"""Reward models trained by the project: preference pairs, Bradley–Terry training, and
`grpo-stream rm train | eval` (`cli`). A role beside the learner (layer 3): it reads
buffers and tasks, and its folders are served by `grpo_stream.serving.rm_server`."""
