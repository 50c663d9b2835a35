"""Held-out evaluation over policy versions.

- `passk.py`: pass@k (the unbiased estimator of Chen et al. 2021) and mean@k, pure.
- `evaluate.py`: one evaluation of the held-out prompts on the vLLM servers at a known
  policy version (greedy pass@1, mean@k, pass@k, rewards, lengths, truncation).
- `record.py`: the `EvalRow` record, RUN/eval.jsonl, TensorBoard, the printed table.
- `progress.py`: the evaluator's published progress, which the learner waits on before
  a weight sync replaces a version due for evaluation.
- `follow.py`: the evaluator process of `grpo-stream run` (`eval.every`).
- `cli.py`: `grpo-stream eval` on a checkpoint, a run or any model folder.
- `plot.py`: eval curves for `grpo-stream plot`.

The held-out prompts themselves come from `grpo_stream.tasks.heldout`, which the
generator also uses to keep them out of training. This package's `__init__` imports
nothing, so the learner can import `grpo_stream.eval.progress` cheaply.
"""
