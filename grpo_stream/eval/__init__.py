"""Held-out evaluation over policy versions.

- `passk.py`: pass@k (the unbiased estimator of Chen et al. 2021) and mean@k, pure.
- `evaluate.py`: one evaluation of the held-out prompts on the vLLM servers at a known
  policy version (greedy pass@1, mean@k, pass@k, rewards, lengths, truncation).
- `record.py`: the `EvalRow` record, RUN/eval.jsonl, TensorBoard, the printed table.
- `follow.py`: the evaluator process of `grpo-stream run` (`eval.every`).
- `cli.py`: `grpo-stream eval` on a checkpoint, a run or any model folder.
- `plot.py`: eval curves for `grpo-stream plot`.

The held-out prompts themselves come from `grpo_stream.tasks.heldout`, which the
generator also uses to keep them out of training. The file the evaluator publishes
after each evaluation, which the learner waits on, is `grpo_stream.core.eval_progress`
(the learner never imports this package).
"""
