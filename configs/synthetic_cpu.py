"""The demo: the tiny CPU network on the synthetic identities made by ``make demo`` (2 gloo ranks).

torchrun --nproc_per_node=2 launch/train.py configs/synthetic_cpu.py
"""
from pfc.train.config import (
    BackboneConfig, CheckpointConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/demo",
    log_every=10,
    data=DataConfig(root="demo/shards", batch_size=64, num_workers=1),
    backbone=BackboneConfig(network="tiny", embedding_size=128),
    head=HeadConfig(sample_rate=1.0, margin=MarginConfig(s=32.0, m1=1.0, m2=0.3, m3=0.0)),
    optim=OptimConfig(lr=0.1, weight_decay=5e-4),
    schedule=ScheduleConfig(num_epochs=6, warmup_steps=10),
    eval=EvalConfig(pairs="demo/heldout/pairs.txt", batch_size=128),
    checkpoint=CheckpointConfig(every_minutes=30),   # a crash or a SIGKILL loses at most 30 minutes
)
