"""Fine-tune a trained backbone on a small custom set (thousands of identities, a few images each).

    torchrun --nproc_per_node=2 launch/train.py configs/finetune_small.py --data DIR \\
        --init_backbone runs/ms1mv3_r50 --network iresnet50 --val_pairs PAIRS

The backbone starts from ``--init_backbone`` (a backbone.pt, or a run's output folder; its
network and embedding size must be the config's) with fresh class centers. For the first
``freeze_steps`` steps only the centers train, the backbone in eval mode (its BatchNorm
statistics kept): centers that start random would otherwise send large, meaningless gradients
into the pretrained features. Then everything trains at a tenth of the from-scratch learning
rate, the backbone with its own warmup, cosine decay to 0. Full softmax (ρ = 1: a few thousand
classes fit), ArcFace (1, 0.5, 0), s = 64, batch 64 per rank: a set of 5,000 identities × 4
images is 20,000 images, 156 steps per epoch on 2 ranks, so 20 epochs are about 3,100 steps.
See README "Fine-tuning" and ``bench/finetune.py`` (the synthetic comparison with training from scratch).
"""
from pfc.train.config import (
    BackboneConfig, CheckpointConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/finetune_small",
    data=DataConfig(batch_size=64),
    backbone=BackboneConfig(network="iresnet50", embedding_size=512, precision="fp16", freeze_steps=200),
    head=HeadConfig(sample_rate=1.0, margin=MarginConfig(s=64.0, m1=1.0, m2=0.5, m3=0.0)),
    optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=5e-4),
    schedule=ScheduleConfig(num_epochs=20, warmup_steps=100, kind="cosine"),
    eval=EvalConfig(every=500),
    checkpoint=CheckpointConfig(every_minutes=30),   # a crash or a SIGKILL loses at most 30 minutes
)
