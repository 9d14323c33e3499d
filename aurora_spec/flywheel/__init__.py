"""The flywheel: the EAGLE-3 draft head learns from live traffic (DESIGN.md section 3).

Serving process                                 Trainer process (worker.py, spawn, nice 10)
  engine --trace_sink--> learner.OnlineLearner     trainer.Trainer
    traces.record_step -> traces.TraceBuffer  ==>    batch.WindowAssembler -> replay.WindowStore
    publisher.Publisher (swap between steps,         losses.flywheel_loss (TTT-unrolled KL +
      rollback, live acceptance by version)  <==       discard KL), vocab.VocabBuilder, gate
    checkpoints.CheckpointStore (safetensors)          candidates -> checkpoints -> publisher

Entry points: ``OnlineLearner(model, drafter_or_engine, LearnerConfig())`` (config.py), the
``aurora train`` / ``aurora export`` commands (cli.py, offline.py, export.py).
"""
