"""Training: mesh and sharding from config, optimizer, checkpoints, and the train loop (`train.train_and_evaluate`)."""
