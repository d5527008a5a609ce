"""ViT-L on WebFace42M (2,059,906 ids, 42.47 M images) with Partial FC ρ = 0.3: insightface's
arcface_torch wf42m_pfc03_40epoch_64gpu_vit_l recipe, network ``vit_l_dp005_mask_005`` (insightface's name).

64 GPUs × 384 (insightface publishes no 8-GPU ViT-L recipe; on 8 GPUs --grad_accumulation 8 keeps
the global batch).
AdamW lr 1e-3 and weight decay 0.1 on every backbone parameter and on the class centers
(``head.optimizer="adamw"``; the centers' lr and decay default to the backbone's, as insightface's
one AdamW over both), linear warmup over 4 of 40 epochs, then polynomial decay to 0; CosFace
margin (1, 0, 0.4), s = 64; backbone gradient norm clipped to 5; fp16 autocast with loss scaling.
Decay power 2: insightface's PolyScheduler fixed power = 2 when its released models and logs were
trained; its lr_scheduler.py today holds PolynomialLRWarmup (power = 1.0 by default), which its
train_v2.py calls without a power, so its code now decays linearly (``--schedule.power 1``).
Warmup in steps: 42,474,557 images // 24,576 per step = 1,728 steps per epoch, × 4 =
6,912; with another global batch set ``--warmup_steps`` to 4 epochs of steps.

    torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
        launch/train.py configs/wf42m_pfc03_vit_l.py --data /data/wf42m
"""
from pfc.train.config import (
    BackboneConfig, CheckpointConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/wf42m_pfc03_vit_l",
    data=DataConfig(batch_size=384),
    backbone=BackboneConfig(network="vit_l_dp005_mask_005", embedding_size=512, precision="fp16",
                            grad_checkpointing=True),   # insightface builds vit_b/l/h with using_checkpoint=True
    head=HeadConfig(sample_rate=0.3, optimizer="adamw", margin=MarginConfig(s=64.0, m1=1.0, m2=0.0, m3=0.4)),
    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, grad_clip=5.0, grad_accumulation=1),
    schedule=ScheduleConfig(num_epochs=40, warmup_steps=6912, kind="poly", power=2.0),
    eval=EvalConfig(every=2000),
    checkpoint=CheckpointConfig(every_minutes=30),   # a crash or a SIGKILL loses at most 30 minutes
)
