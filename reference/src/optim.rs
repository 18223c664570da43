//! Optimizer steps, LR schedules, WSM merging and EMA in f64 (optim.md).
