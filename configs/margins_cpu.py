"""The margin table's recipe (bench/margins.py): the tiny CPU network on 56x56 synthetic identities.

bench/margins.py makes the data, sets ``data.root``/``eval.pairs``/``output``/``seed`` and one
margin (or regulariser) per row on top of this; everything else is the same for every row:

    torchrun --nproc_per_node=2 launch/train.py configs/margins_cpu.py --data DIR --output OUT ...

56-pixel images make a step about 4x cheaper than the demo's 112 pixels: a run took 30-50 s on
our 2 shared CPU cores at load 5-7 and 60-190 s at load 13-21 (30 runs, 10 rows x 3 seeds: about
20 and 55 minutes). The scale s is the same for every loss (32) so that the rows differ in the
margin alone.
"""
from pfc.train.config import (
    BackboneConfig, DataConfig, EvalConfig, HeadConfig, MarginConfig, OptimConfig,
    ScheduleConfig, TrainConfig
)

config = TrainConfig(
    output="runs/margins/run",
    log_every=25,
    data=DataConfig(root="runs/margins/data/shards", batch_size=64, num_workers=1),
    backbone=BackboneConfig(network="tiny", embedding_size=128),
    head=HeadConfig(sample_rate=1.0, margin=MarginConfig(s=32.0, m1=1.0, m2=0.0, m3=0.0)),
    optim=OptimConfig(lr=0.1, weight_decay=5e-4),
    schedule=ScheduleConfig(max_steps=160, warmup_steps=10),
    eval=EvalConfig(pairs="runs/margins/data/heldout/pairs.txt", batch_size=250),
)
