"""The demo: the tiny CPU network on the synthetic identities made by ``make demo`` (2 gloo ranks).

torchrun --nproc_per_node=2 launch/train.py configs/synthetic_cpu.py
"""
from pfc.train.config import MarginConfig, TrainConfig

config = TrainConfig(
    data="demo/shards",
    output="runs/demo",
    num_workers=1,
    network="tiny",
    embedding_size=128,
    margin=MarginConfig(s=32.0, m1=1.0, m2=0.3, m3=0.0),
    sample_rate=1.0,
    batch_size=64,
    lr=0.1,
    weight_decay=5e-4,
    num_epochs=6,
    warmup_steps=10,
    log_every=10,
    val_pairs="demo/heldout/pairs.txt",
    eval_batch_size=128,
)
