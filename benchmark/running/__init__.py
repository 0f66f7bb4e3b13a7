"""Running and recording: the flow of one run, its records and metrics, checkpoints and shards, path replay, the
full battery and submissions. Uses the attacks, the suites and defenses, and the modeling layer; nothing above."""
