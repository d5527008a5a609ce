"""A small ViT on the demo's synthetic identities (``make demo``'s data), 2 gloo CPU ranks.

    torchrun --nproc_per_node=2 launch/train.py configs/synthetic_vit_cpu.py \
        --data demo/shards --val_pairs demo/heldout/pairs.txt

``vit_cpu`` is insightface's face ViT (9×9 patches, 144 tokens, pre-norm blocks, the flatten →
Linear → BN → Linear → BN feature head, drop-path and token masking) at width 64 and depth 4
(0.85 M parameters, 0.08 GFLOPs per image against vit_t's 3.0). The backbone trains with AdamW
as insightface's ViT recipes (lr 1e-3, weight decay 0.1, gradient clipping at 5, a warmup); the
demo's margin and scale, so its accuracy compares with the demo's. The centers take AdamW too
(``head.optimizer="adamw"``, at the backbone's lr and weight decay, as insightface's one AdamW
over both; at ρ = 1 the row-sparse AdamW is dense AdamW). Results and timing: docs/benchmarks.md,
"A small ViT on CPU".
"""
from pfc.train.config import (
    BackboneConfig, CheckpointConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/demo_vit",
    log_every=10,
    data=DataConfig(root="demo/shards", batch_size=64, num_workers=1),
    backbone=BackboneConfig(network="vit_cpu", embedding_size=128),
    head=HeadConfig(sample_rate=1.0, optimizer="adamw", margin=MarginConfig(s=32.0, m1=1.0, m2=0.3, m3=0.0)),
    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, grad_clip=5.0),
    schedule=ScheduleConfig(num_epochs=6, warmup_steps=20),
    eval=EvalConfig(pairs="demo/heldout/pairs.txt", batch_size=128),
    checkpoint=CheckpointConfig(every_minutes=30),
)
