"""IResNet-100 on WebFace42M (2,059,906 ids, 42.47 M images) with Partial FC ρ = 0.2.

insightface's arcface_torch wf42m_pfc02_r100 recipe: 8 GPUs × 128, SGD lr 0.1, momentum 0.9,
weight decay 5e-4, polynomial (power 2) decay over 20 epochs, no warmup, CosFace margin (1, 0, 0.4),
s = 64, 20 % of the negative class centers sampled per step.
Power 2 is what insightface's PolyScheduler fixed when its released models and logs were trained;
its lr_scheduler.py today holds PolynomialLRWarmup (power = 1.0 by default, called without a power
by train_v2.py): its code now decays linearly (``--schedule.power 1`` to match it).
"""
from pfc.train.config import (
    BackboneConfig, CheckpointConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/webface42m_r100_pfc02",
    data=DataConfig(batch_size=128),
    backbone=BackboneConfig(network="iresnet100", embedding_size=512, precision="fp16"),
    head=HeadConfig(sample_rate=0.2, margin=MarginConfig(s=64.0, m1=1.0, m2=0.0, m3=0.4)),
    optim=OptimConfig(lr=0.1, weight_decay=5e-4),
    schedule=ScheduleConfig(num_epochs=20),
    eval=EvalConfig(every=10000),
    checkpoint=CheckpointConfig(every_minutes=30),   # a crash or a SIGKILL loses at most 30 minutes
)
