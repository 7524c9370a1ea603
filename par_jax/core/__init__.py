"""The run machinery every job shares and that knows nothing of PAR: device mesh, sharding rules, optimizer,
checkpoints (orbax) and the rule for finding them, state-dict files, multi-process start-up, and the loop kit the
training loops are built from. Everything above it (model, data, tokenizer, training, sampling, evaluation) may
import it; it imports none of them."""
