"""The serving loop: the engine thread, scheduler, sequences, sampling, the model runner, CUDA graphs,
metrics, and the store follower that feeds released versions to the engine."""
