"""The SGLang rollout engine (rollout.engine=sglang): servers colocated with the trainer or on GPUs of their own."""
