"""CosFace IResNet-100 on Glint360K (360,232 ids, 17.09 M images), insightface's arcface_torch recipe.

8 GPUs × 128; SGD lr 0.1, momentum 0.9, weight decay 1e-4, polynomial (power 2) decay over 20 epochs,
no warmup; CosFace margin (m1, m2, m3) = (1, 0, 0.4) with s = 64; full softmax (ρ = 1).
Power 2 is what insightface's PolyScheduler fixed when its released models and logs were trained;
its lr_scheduler.py today holds PolynomialLRWarmup (power = 1.0 by default, called without a power
by train_v2.py): its code now decays linearly (``--schedule.power 1`` to match it).
"""
from pfc.train.config import (
    BackboneConfig, CheckpointConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/glint360k_r100",
    data=DataConfig(batch_size=128),
    backbone=BackboneConfig(network="iresnet100", embedding_size=512, precision="fp16"),
    head=HeadConfig(sample_rate=1.0, margin=MarginConfig(s=64.0, m1=1.0, m2=0.0, m3=0.4)),
    optim=OptimConfig(lr=0.1, weight_decay=1e-4),
    schedule=ScheduleConfig(num_epochs=20),
    eval=EvalConfig(every=2000),
    checkpoint=CheckpointConfig(every_minutes=30),   # a crash or a SIGKILL loses at most 30 minutes
)
